"""The mini flow model's training phase: it trains, resumes, hands off across machines and
exports a stock FluxPipeline folder whose text encoder slots take MiniLM."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from hypersd.generate import generate

from hypersd.models.mini_flow import MINI_FLOW_DIR, load_flow_text_encoder
from hypersd.teacher import TeacherConfig, train_teacher
from hypersd.teacher.config import FLOW_HANDOFF, TEACHER_HANDOFF
from hypersd.teacher.flow import export_flow_pipeline
from hypersd.teacher.train import handoff_from_checkpoint


def test_stock_diffusers_loads_the_bundled_flow_model_and_matches_ours():
    tok, enc = load_flow_text_encoder()
    pipe = FluxPipeline.from_pretrained(MINI_FLOW_DIR, text_encoder=enc, text_encoder_2=enc, tokenizer=tok,
                                        tokenizer_2=tok, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.joint_attention_dim == enc.config.hidden_size == 384
    stock = pipe(["rocket", "red apple"], negative_prompt=["", ""], true_cfg_scale=3.0, max_sequence_length=32,
                 height=32, width=32, num_inference_steps=4,
                 generator=[torch.Generator().manual_seed(0) for _ in range(2)]).images
    # no recipe named: the bundled flow model runs with its own (mini-flow: true CFG 3)
    ours = generate(["rocket", "red apple"], model="mini-flow", steps=4, seed=0).images
    a = np.stack([np.asarray(i, np.float32) for i in stock])
    b = np.stack([np.asarray(i, np.float32) for i in ours])
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 32, 32, 3) and np.abs(a[0] - a[1]).mean() > 5, "different prompts gave the same image"


def test_flow_phase_has_its_own_handoff():
    assert TeacherConfig(phase="flow").handoff == FLOW_HANDOFF != TEACHER_HANDOFF
    assert TeacherConfig(phase="flow", handoff="x.safetensors").handoff == "x.safetensors"


def test_flow_phase_trains_resumes_hands_off_and_exports(tmp_path):
    handoff = tmp_path / "flow.safetensors"
    common = dict(phase="flow", run_dir=str(tmp_path / "run"), batch_size=4, max_images=16, checkpoint_every=2,
                  warmup_steps=1, handoff=str(handoff), threads=1)
    train_teacher(TeacherConfig(steps=2, **common))
    train_teacher(TeacherConfig(steps=4, **common))  # resumes from step 2
    assert sorted(p.name for p in (tmp_path / "run" / "flow-checkpoints").iterdir()) == \
        ["step-00000002", "step-00000004"]
    from safetensors import safe_open
    with safe_open(str(handoff), "pt") as f:  # fp16, half what a session commits
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert handoff_from_checkpoint(tmp_path / "run", str(tmp_path / "again.safetensors"), "flow") == 4
    # another machine: no checkpoints, the handoff file only
    moved = dict(common, run_dir=str(tmp_path / "elsewhere"))
    train_teacher(TeacherConfig(steps=5, **moved))
    assert [p.name for p in (tmp_path / "elsewhere" / "flow-checkpoints").iterdir()] == ["step-00000005"]

    out = export_flow_pipeline(tmp_path / "run", tmp_path / "pipe")
    tok, enc = load_flow_text_encoder()
    pipe = FluxPipeline.from_pretrained(out, text_encoder=enc, text_encoder_2=enc, tokenizer=tok,
                                        tokenizer_2=tok, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(["rocket", "red apple"], negative_prompt=["", ""], true_cfg_scale=3.0, max_sequence_length=32,
                 height=32, width=32, num_inference_steps=2,
                 generator=[torch.Generator().manual_seed(0) for _ in range(2)]).images
    assert stock[0].size == (32, 32)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.transformer.dtype == torch.float32
    # hypersd's own path: MiniLM in both slots, its 32 tokens, the VAE's 32 px, true CFG
    ours = generate(["rocket", "red apple"], model=str(out), recipe="mini-flow", steps=2, seed=0).images
    for a, b in zip(stock, ours):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and hypersd eval: its reference set is the flow model's own 25-step recipe
    from hypersd.evaluate import EvalConfig, run_eval
    rows = run_eval(EvalConfig(model=str(out), recipe="flow-student", steps=[1], samples=4, batch=4,
                               out_dir=str(tmp_path / "eval"), grid_prompts=2))
    assert set(rows) == {"flow-student@1"} and rows["flow-student@1"]["fd_teacher"] >= 0
    assert len(list((tmp_path / "eval" / "images").glob("reference-*/*.png"))) == 4


def test_a_missing_bundled_flow_model_says_how_to_make_it(monkeypatch, tmp_path):
    from hypersd.errors import UserError
    from hypersd.generate import loading
    monkeypatch.setattr(loading, "MINI_FLOW_DIR", tmp_path / "nowhere")
    with pytest.raises(UserError, match="scripts/train_flow.sh"):
        loading.load_pipeline("mini-flow")
