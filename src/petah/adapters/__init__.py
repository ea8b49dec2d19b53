"""Adapter layers and their life cycle on a backbone (inject / merge / unmerge / restore)."""

from petah.adapters.channel_scale import ChannelScale
from petah.adapters.model import TaskAdapter, refresh_attention_caches, remove_adapter
from petah.adapters.shadow import release, shadow_copy, transplant

__all__ = ["ChannelScale", "TaskAdapter", "refresh_attention_caches", "release", "remove_adapter", "shadow_copy",
           "transplant"]
