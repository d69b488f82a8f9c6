"""All-CNN-C (Springenberg et al., ICLR 2015) on CIFAR-10 with Keras 3.

Submodules import Keras lazily so the CLI starts fast:
`allcnn.model.build_model`, `allcnn.data.load_cifar10`,
`allcnn.training.train` and `resume`, and the evaluation/prediction modules.
"""

__version__ = "0.1.0"
