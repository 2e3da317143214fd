"""ComfyUI's face: its HTTP API, websocket and core nodes, served by `sdlab serve` beside the web
UI's /sdapi/v1, on the same loaded model and in the same job queue (docs/comfyui.md).

    nodes.py     the node classes: each a thin call of the generation steps (`sdlab.steps`)
    graph.py     validation, ComfyUI's cache keys, execution of one prompt in the worker
    state.py     the queue records, history, websocket hub and the input/output folders
    routes.py    the routes, at the root and again under /api
"""
