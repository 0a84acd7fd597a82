"""Models: ResNet and ViT backbones, projection head, the SimCLR model."""
from simclr_jax.models.heads import ProjectionHead
from simclr_jax.models.resnet import output_width
from simclr_jax.models.resnet import ResNet
from simclr_jax.models.simclr import create_model
from simclr_jax.models.simclr import create_teacher_model
from simclr_jax.models.simclr import representation_width
from simclr_jax.models.simclr import SimCLRModel
from simclr_jax.models.vit import VisionTransformer

__all__ = ['ProjectionHead', 'ResNet', 'SimCLRModel', 'VisionTransformer',
           'create_model', 'create_teacher_model', 'output_width',
           'representation_width']
