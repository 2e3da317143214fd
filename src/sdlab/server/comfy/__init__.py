"""ComfyUI's face: its HTTP API, websocket and core nodes, served by `sdlab serve` beside the web
UI's /sdapi/v1, on the same loaded model and in the same job queue (docs/comfyui.md).

    nodes.py     ComfyUI's core nodes: each a thin call of the generation steps (`sdlab.steps`);
                 nodes_sd3.py, nodes_control.py, nodes_upscale.py those of its extras files, and
                 registry.py all of them by class name
    values.py    what travels on the links (MODEL, CLIP, VAE, LATENT spaces, CONTROL_NET)
    guidance.py  a KSampler's conditionings (areas, ControlNets) as the guided denoiser
    loaders.py   files a graph loads beside a checkpoint (VAE, SD3 encoders) and their listings
    previews.py  the binary preview frames a prompt may ask for
    graph.py     validation, ComfyUI's cache keys, execution of one prompt in the worker
    state.py     the queue records, history, websocket hub and the input/output folders
    routes.py    the routes, at the root and again under /api
    editor.py    ComfyUI's own editor at /comfy/ (the `comfy` extra) and the routes it boots on:
                 users, settings, saved workflows (userdata), templates (templates/default.json)
"""
