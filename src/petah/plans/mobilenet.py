"""MobileNetV2 / V3: the plain-CNN reference. Pointwise convs play the MLP role."""

from petah.plans.base import Family

FAMILY = Family(
    name="mobilenet",
    models=r"^(tf_)?mobilenetv[23]",
    roles={
        "mlp": r"(\.conv_pw|\.conv_pwl|^blocks\.\d+\.\d+\.conv|^conv_head)$",
        "conv": r"^conv_stem$",
    },
    stage=r"^blocks\.(\d+)\.",
    has_attention=False,
    prunable=True,
)
