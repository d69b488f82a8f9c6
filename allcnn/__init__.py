"""All-CNN-C (Springenberg et al., ICLR 2015) on CIFAR-10 with Keras 3.

The package imports nothing heavy itself, and the CLI imports Keras only inside a
command, so `allcnn --help` starts fast. The API: `allcnn.model.build_model`,
`allcnn.data.load_dataset` (CIFAR-10, CIFAR-100, image folders),
`allcnn.training.train` and `resume`, and the
evaluation, prediction, explain and export modules.
"""

__version__ = "0.1.0"
