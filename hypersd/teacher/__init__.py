"""Training the mini model's teacher: first the VAE, then the text-conditioned UNet."""

from hypersd.teacher.config import TeacherConfig
from hypersd.teacher.train import export_pipeline, train_teacher

__all__ = ["TeacherConfig", "export_pipeline", "train_teacher"]
