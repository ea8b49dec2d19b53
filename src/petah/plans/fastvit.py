"""FastViT: RepMixer stages, plus attention in the last stage of the SA / MA variants.

petah reparameterizes FastViT when the backbone is built (timm's `reparameterize_model`), before
anything is adapted or fingerprinted: the adapters then sit on the convs the device runs
(`reparam_conv`), merge into them exactly, and the shared backbone is the inference graph.
The other order (adapt the train-time branches, merge, then reparameterize) trains 3–4 parallel
branches per block and yields the same inference graph; see docs/plans.md for the measurement.

`fastvit_t8 / t12 / s12` have no attention: they get the conv-only family below (no `attn-lora`).
"""

from petah.plans.base import Family

_ROLES = {
    "attn": r"\.token_mixer\.(qkv|proj)$",
    "mlp": r"\.mlp\.(fc1|fc2)$|^final_conv\.se\.fc[12]$",
    "conv": r"^stem\.\d+\.reparam_conv$|\.downsample\.proj\.\d+\.reparam_conv$",
}

FAMILY = Family(
    name="fastvit",
    models=r"^fastvit_(sa|ma)\d+",
    roles=_ROLES,
    stage=r"^stages\.(\d+)\.",
)

CONV_FAMILY = Family(
    name="fastvit-conv",
    models=r"^fastvit_(t|s)\d+",
    roles={k: v for k, v in _ROLES.items() if k != "attn"},
    stage=r"^stages\.(\d+)\.",
    has_attention=False,
)
