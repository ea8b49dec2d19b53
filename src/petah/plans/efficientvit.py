"""EfficientViT — MIT (`efficientvit_b*` / `l*`) and MSRA (`efficientvit_m*`).

MIT: `LiteMLA` (ReLU linear attention) with 1×1 ConvNormAct `qkv` / `proj` and multi-scale
aggregation (depthwise 5×5 + grouped 1×1, both ChannelScale in the `petah` plan), MBConv
(`inverted_conv` / `point_conv` 1×1, depthwise `depth_conv`). With `num_classes=0` timm keeps
the head's 1×1 conv and first Linear in the backbone; they count as MLP layers. Any input size.

MSRA: `CascadedGroupAttention` with a 1×1 `qkvs.<head>` conv and a depthwise 5×5 `dws.<head>`
per head and `attention_biases` fixed by the input size when the model is built (like
EfficientFormerV2), so the input size is a build argument.
"""

from petah.plans.base import Family

FAMILY = Family(
    name="efficientvit",
    models=r"^efficientvit_[bl]\d",
    roles={
        "attn": r"\.context_module\.main\.(qkv|proj)\.conv$",
        "mlp": r"\.main\.(inverted_conv|point_conv)\.conv$|^head\.in_conv\.conv$|^head\.classifier\.0$",
        "conv": r"^stem\.in_conv\.conv$",
    },
    stage=r"^stages\.(\d+)\.",
)

MSRA_FAMILY = Family(
    name="efficientvit-msra",
    models=r"^efficientvit_m\d",
    roles={
        "attn": r"\.attn\.(qkvs\.\d+|proj\.\d+)\.conv$",
        "mlp": r"\.m\.pw[12]\.conv$|\.patchmerge\.conv[13]\.conv$|\.patchmerge\.se\.fc[12]$",
        "conv": r"^patch_embed\.conv\d\.conv$",
    },
    stage=r"^stages\.(\d+)\.",
    img_size_kwarg=True,
    img_size_multiple=64,
)
