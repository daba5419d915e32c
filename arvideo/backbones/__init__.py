"""Backbone adapters: one file per model family, each implementing `base.Backbone`."""
from .base import Backbone, CallPlan, KVLayout
from .wan_family import WanFamilyBackbone

__all__ = ["Backbone", "CallPlan", "KVLayout", "WanFamilyBackbone"]
