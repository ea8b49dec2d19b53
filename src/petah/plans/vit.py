"""Plain ViT / DeiT: the transformer reference (attention + MLP, only the patch embedding conv)."""

from petah.plans.base import Family

FAMILY = Family(
    name="vit",
    models=r"^(vit|deit|deit3)_(tiny|small|base)_patch\d+",
    roles={
        "attn": r"\.attn\.(qkv|proj)$",
        "mlp": r"\.mlp\.(fc1|fc2)$",
        "conv": r"^patch_embed\.proj$",
    },
    stage=r"^blocks\.(\d+)\.",
    img_size_kwarg=True,
    img_size_multiple=16,
)
