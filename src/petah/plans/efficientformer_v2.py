"""EfficientFormerV2 (s0/s1/s2/l): 1x1 ConvNorm q/k/v/proj, depthwise `v_local` and MLP `mid`.

The input size is fixed when the model is built (`img_size=`); `attention_biases` depend on it.
Talking-head convs (heads x heads) are left alone: they are a few dozen weights.
"""

from petah.plans.base import Family

FAMILY = Family(
    name="efficientformerv2",
    models=r"^efficientformerv2_",
    roles={
        "attn": r"\.(token_mixer|attn)\.(q|k|v|proj)(\.proj)?\.conv$",
        "mlp": r"\.mlp\.(fc1|fc2)\.conv$",
        "conv": r"^stem\.conv\d\.conv$|\.downsample\.conv\.conv$",
    },
    stage=r"^stages\.(\d+)\.",
    img_size_kwarg=True,
    prunable=True,
)
