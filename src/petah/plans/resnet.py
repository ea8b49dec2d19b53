"""ResNet: the plain-CNN reference; every convolution is a dense conv."""

from petah.plans.base import Family

FAMILY = Family(
    name="resnet",
    models=r"^resnet\d+[a-z]?$",
    roles={
        "conv": r"^conv1$|^conv1\.\d+$|\.conv\d$|\.downsample\.\d+$",
    },
    stage=r"^layer(\d)\.",
    has_attention=False,
    prunable=True,
)
