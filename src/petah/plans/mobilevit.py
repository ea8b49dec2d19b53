"""MobileViT v1 (`mobilevit_xxs/xs/s`) and v2 (`mobilevitv2_*`): MobileNetV2-style stages, then
MobileViT blocks (local k×k conv → 1×1 projection → transformer over unfolded patches → 1×1
projection back → fusion conv).

v1's transformer has Linear `attn.qkv` / `attn.proj` and Linear MLPs; v2's `LinearSelfAttention`
uses 1×1 convs `attn.qkv_proj` / `attn.out_proj` and its MLP is 1×1 convs too. v2's `conv_kxk`
is depthwise (a ChannelScale in the `petah` plan), v1's is dense. Any input size works (blocks
interpolate maps that the 2×2 patches do not tile).
"""

from petah.plans.base import Family

FAMILY = Family(
    name="mobilevit",
    models=r"^mobilevit(v2)?_",
    roles={
        "attn": r"\.transformer\.\d+\.attn\.(qkv|proj|qkv_proj|out_proj)$",
        "mlp": r"\.transformer\.\d+\.mlp\.(fc1|fc2)$|\.conv[13]_1x1\.conv$|\.conv_1x1$"
               r"|\.conv_proj\.conv$|^final_conv\.conv$",
        "conv": r"^stem\.conv$|\.conv_kxk\.conv$|\.conv_fusion\.conv$",
    },
    stage=r"^stages\.(\d+)\.",
)
