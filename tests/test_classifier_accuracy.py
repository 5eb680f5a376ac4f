"""The bundled emoji network recognises the dataset's own images (the mini world's CLIP score)."""

from PIL import Image

from hypersd.data import load_emoji32
from hypersd.metrics.mini import MiniMetrics


def test_bundled_network_names_at_least_95_percent_of_the_dataset():
    data = load_emoji32()
    metrics = MiniMetrics()
    scored = metrics.score([Image.fromarray(img) for img in data.images], data.captions)
    top1 = (scored.rank < 1).mean() * 100
    top5 = (scored.rank < 5).mean() * 100
    print(f"top-1 {top1:.2f}%, top-5 {top5:.2f}% on {len(data)} images")
    assert top1 >= 95.0 and top5 >= 99.0
