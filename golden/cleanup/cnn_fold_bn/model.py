"""`cleanup,fold-bn` on the same CNN as cleanup/cnn: the BatchNormalization folds into conv1."""

from golden.cleanup.cnn.model import build  # noqa: F401
