"""EfficientFormer (V1, l1/l3/l7): Meta4D conv blocks, then Meta3D attention blocks.

The attention's `qkv` Linear interleaves q/k/v per head; LoRA adapts the whole matrix, so the
interleaving needs no special handling. timm ignores `img_size`: the model runs only at 224.
"""

from petah.plans.base import Family

FAMILY = Family(
    name="efficientformer",
    models=r"^efficientformer_l\d+",
    roles={
        "attn": r"\.token_mixer\.(qkv|proj)$",
        "mlp": r"\.mlp\.(fc1|fc2)$",
        "conv": r"^stem\.conv\d$|\.downsample\.conv$",
    },
    stage=r"^stages\.(\d+)\.",
    fixed_img_size=224,
    prunable=True,
)
