"""SimCLRv2 self-distillation on ImageNet, the teacher fine-tuned on 10% of labels.

`imagenet_distill_1pct.py` (SimCLRv2 §2, §3: the same unlabeled images, τ
0.1, 400 epochs) with the teacher that `imagenet_finetune_10pct.py` trains
(the reference README's 68.4 % top-1 for ResNet-50 1×):
  --config.teacher_checkpoint=/path/to/finetune_10pct/workdir
The paper adds the labels "when the number of labeled examples is
significant": --config.distill_alpha=0.5 takes them from the 10% subset.
"""
import os
import runpy


def get_config():
  base = runpy.run_path(os.path.join(os.path.dirname(__file__),
                                     'imagenet_distill_1pct.py'))
  config = base['get_config']()
  config.distill_labeled_dataset = 'imagenet2012_subset/10pct'
  return config
