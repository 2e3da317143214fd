"""Every node the graph face has, by ComfyUI's class name: the core nodes (`nodes`) and those of
ComfyUI's extras files (`nodes_sd3`, `nodes_control`, `nodes_upscale`)."""

from __future__ import annotations

from .nodes import CORE_NODES, Node, node_info
from .nodes_control import CONTROL_NODES
from .nodes_sd3 import SD3_NODES
from .nodes_upscale import UPSCALE_NODES

__all__ = ["NODES", "Node", "node_info"]

NODES: dict[str, type[Node]] = {**CORE_NODES, **SD3_NODES, **CONTROL_NODES, **UPSCALE_NODES}
