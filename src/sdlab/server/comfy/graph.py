"""One API-format prompt: validation (ComfyUI's execution.py validate_prompt, with its error
types and shapes), cache keys (comfy_execution/caching.py: input values and graph structure,
not node ids) and execution in the worker thread, node by node, with ComfyUI's websocket
messages."""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ...errors import SdlabError
from ...request import Interrupted
from .nodes import Node
from .previews import asks_for_previews, preview_frame, preview_image
from .registry import NODES

log = logging.getLogger(__name__)

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def unwrap(value: Any) -> Any:
    """A literal list widget value comes wrapped as {"__value__": [...]}."""
    if isinstance(value, dict) and "__value__" in value:
        return value["__value__"]
    return value


def _error(kind: str, message: str, details: str = "", **extra) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _types_match(received: str, expected: str) -> bool:
    if received == "*" or expected == "*":
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))


def _spec_of(cls: type[Node], env, name: str) -> list | None:
    spec = cls.inputs(env)
    for group in ("required", "optional"):
        if name in spec.get(group, {}):
            return spec[group][name]
    return None


class Validator:
    """ComfyUI's validate_inputs over one prompt, memoised per node; coerced values are written
    back into the prompt."""

    def __init__(self, prompt: dict, env):
        self.prompt, self.env = prompt, env
        self.validated: dict[str, tuple[bool, list[dict]]] = {}
        self._specs: dict[str, dict] = {}

    def spec(self, class_type: str) -> dict:
        if class_type not in self._specs:
            self._specs[class_type] = NODES[class_type].inputs(self.env)
        return self._specs[class_type]

    def node(self, node_id: str, visiting: frozenset = frozenset()) -> tuple[bool, list[dict]]:
        if node_id in self.validated:
            return self.validated[node_id]
        node = self.prompt[node_id]
        cls = NODES[node["class_type"]]
        spec = self.spec(node["class_type"])
        inputs = node.setdefault("inputs", {})
        if not isinstance(inputs, dict):
            inputs = node["inputs"] = {}
        errors: list[dict] = []
        valid = True
        entries = [(n, s, True) for n, s in spec.get("required", {}).items()]
        entries += [(n, s, False) for n, s in spec.get("optional", {}).items()]
        for name, info, required in entries:
            if name not in inputs:
                if required:
                    errors.append(_error("required_input_missing", "Required input is missing", name,
                                         input_name=name))
                continue
            value = inputs[name]
            type_input = info[0]
            options = info[1] if len(info) > 1 and isinstance(info[1], dict) else {}
            if isinstance(value, list) and not is_link(value) or (is_link(value) and value[0] not in self.prompt):
                errors.append(_error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                     name, input_name=name, input_config=info, received_value=value))
                continue
            if is_link(value):
                source_id, slot = value
                source = self.prompt[source_id]
                returns = NODES[source["class_type"]].RETURN_TYPES
                if not 0 <= slot < len(returns):
                    errors.append(_error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                         name, input_name=name, input_config=info, received_value=value))
                    continue
                received = returns[slot]
                expected = "COMBO" if isinstance(type_input, list) else type_input
                if not _types_match(received, expected):
                    errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes",
                                         f"{name}, received_type({received}) mismatch input_type({expected})",
                                         input_name=name, input_config=info, received_type=received,
                                         linked_node=value))
                    continue
                if source_id in visiting:
                    errors.append(_error("dependency_cycle", "Dependency cycle detected", name, input_name=name,
                                         linked_node=value))
                    continue
                try:
                    ok, _ = self.node(source_id, visiting | {node_id})
                except Exception as e:  # noqa: BLE001 - ComfyUI reports it on the node
                    ok = False
                    self.validated[source_id] = (False, [_error(
                        "exception_during_inner_validation", "Exception when validating inner node", str(e),
                        input_name=name, input_config=info, exception_message=str(e),
                        exception_type=type(e).__name__, traceback=traceback.format_tb(e.__traceback__),
                        linked_node=value)])
                if not ok:
                    valid = False
                continue
            value = unwrap(value)
            try:
                if type_input == "INT":
                    value = int(value)
                elif type_input == "FLOAT":
                    value = float(value)
                elif type_input == "STRING":
                    value = str(value)
                elif type_input == "BOOLEAN":
                    value = bool(value)
                inputs[name] = value
            except (TypeError, ValueError, OverflowError) as e:
                errors.append(_error("invalid_input_type", f"Failed to convert an input value to a {type_input} value",
                                     f"{name}, {value}, {e}", input_name=name, input_config=info,
                                     received_value=value, exception_message=str(e)))
                continue
            if type_input in ("INT", "FLOAT") and isinstance(value, float) and not math.isfinite(value):
                errors.append(_error("invalid_input_type", f"Failed to convert an input value to a {type_input} value",
                                     f"{name}, {value}, not a finite number", input_name=name, input_config=info,
                                     received_value=value))
                continue
            if name in cls.CUSTOM_VALIDATED:
                continue
            if "min" in options and type_input in ("INT", "FLOAT") and value < options["min"]:
                errors.append(_error("value_smaller_than_min", f"Value {value} smaller than min of {options['min']}",
                                     name, input_name=name, input_config=info, received_value=value))
                continue
            if "max" in options and type_input in ("INT", "FLOAT") and value > options["max"]:
                errors.append(_error("value_bigger_than_max", f"Value {value} bigger than max of {options['max']}",
                                     name, input_name=name, input_config=info, received_value=value))
                continue
            if isinstance(type_input, list) and value not in type_input:
                big = len(type_input) > 20
                listing = f"(list of length {len(type_input)})" if big else str(type_input)
                errors.append(_error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listing}",
                                     input_name=name, input_config=None if big else info, received_value=value))
                continue
        if cls.CUSTOM_VALIDATED and not errors:
            constants = {k: v for k, v in inputs.items() if k in cls.CUSTOM_VALIDATED and not is_link(v)}
            result = cls.validate(self.env, **constants)
            if result is not True:
                for name in constants:
                    details = name if result is False else f"{name} - {result}"
                    errors.append(_error("custom_validation_failed", "Custom validation failed for node", details,
                                         input_name=name, input_config=_spec_of(cls, self.env, name),
                                         received_value=constants[name]))
        out = (valid and not errors, errors)
        self.validated[node_id] = out
        return out


def validate_prompt(prompt: Any, env, targets: list[str] | None = None) -> tuple[bool, dict | None, list[str], dict]:
    """(valid, error, good output ids, node_errors), as ComfyUI's validate_prompt."""
    if not isinstance(prompt, dict):
        return False, _error("invalid_prompt", "Invalid prompt: the prompt must be an object of nodes"), [], {}
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return False, _error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                                 f"Node ID '#{node_id}'"), [], {}
        class_type = node["class_type"]
        if class_type not in NODES:
            title = (node.get("_meta") or {}).get("title", class_type) if isinstance(node.get("_meta"), dict) else class_type
            return False, _error("missing_node_type", f"Node '{title}' not found. The custom node may not be installed.",
                                 f"Node ID '#{node_id}'", node_id=node_id, class_type=class_type,
                                 node_title=title), [], {}
    outputs = [n for n in prompt if NODES[prompt[n]["class_type"]].OUTPUT_NODE]
    if targets is not None:
        outputs = [n for n in outputs if n in set(map(str, targets))]
    if not outputs:
        return False, _error("prompt_no_outputs", "Prompt has no outputs"), [], {}
    validator = Validator(prompt, env)
    good, failed, node_errors = [], [], {}
    for out in sorted(outputs, key=_node_order):
        try:
            ok, reasons = validator.node(out)
        except Exception as e:  # noqa: BLE001
            ok, reasons = False, [_error("exception_during_validation", "Exception when validating node", str(e),
                                         exception_type=type(e).__name__,
                                         traceback=traceback.format_tb(e.__traceback__))]
            validator.validated[out] = (False, reasons)
        if ok:
            good.append(out)
            continue
        failed.append((out, reasons))
        for node_id, (valid, errs) in validator.validated.items():
            if not valid and errs:
                entry = node_errors.setdefault(node_id, {"errors": errs, "dependent_outputs": [],
                                                         "class_type": prompt[node_id]["class_type"]})
                if out not in entry["dependent_outputs"]:
                    entry["dependent_outputs"].append(out)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failed for e in errs)
        return False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), [], node_errors
    return True, None, good, node_errors


def _node_order(node_id: str):
    try:
        return (0, float(node_id.split(":")[0]), node_id)
    except ValueError:
        return (1, 0.0, node_id)


# ---------------------------------------------------------------------------------------------
# Cache keys (comfy_execution/caching.py CacheKeySetInputSignature)

class Signatures:
    def __init__(self, prompt: dict, env):
        self.prompt, self.env = prompt, env
        self._changed: dict[str, Any] = {}
        self._keys: dict[str, str] = {}

    def is_changed(self, node_id: str) -> Any:
        if node_id not in self._changed:
            node = self.prompt[node_id]
            cls = NODES[node["class_type"]]
            if cls.is_changed is Node.is_changed:
                value: Any = False
            else:
                constants = {k: v for k, v in node["inputs"].items() if not is_link(v)}
                try:
                    value = cls.is_changed(self.env, **constants)
                except Exception:  # noqa: BLE001 - NaN in ComfyUI: never equal, always re-run
                    value = f"nan-{uuid.uuid4().hex}"
            self._changed[node_id] = value
        return self._changed[node_id]

    def _ancestry(self, node_id: str) -> tuple[list[str], dict[str, int]]:
        ancestors: list[str] = []
        order: dict[str, int] = {}

        def visit(n: str) -> None:
            inputs = self.prompt[n]["inputs"]
            for key in sorted(inputs):
                if is_link(inputs[key]):
                    a = inputs[key][0]
                    if a not in order:
                        ancestors.append(a)
                        order[a] = len(ancestors) - 1
                        visit(a)

        visit(node_id)
        return ancestors, order

    def _immediate(self, node_id: str, order: dict[str, int]) -> list:
        node = self.prompt[node_id]
        sig: list = [node["class_type"], self.is_changed(node_id)]
        for key in sorted(node["inputs"]):
            value = node["inputs"][key]
            if is_link(value):
                sig.append([key, ["ANCESTOR", order[value[0]], value[1]]])
            else:
                sig.append([key, value])
        return sig

    def key(self, node_id: str) -> str:
        if node_id not in self._keys:
            ancestors, order = self._ancestry(node_id)
            sig = [self._immediate(node_id, order)] + [self._immediate(a, order) for a in ancestors]
            self._keys[node_id] = json.dumps(sig, sort_keys=True, default=repr)
        return self._keys[node_id]


class OutputCache:
    """Node outputs by signature: only the last prompt's nodes survive (ComfyUI's classic cache,
    clean_unused after each prompt)."""

    def __init__(self):
        self.outputs: dict[str, tuple[tuple, dict | None]] = {}

    def clear(self) -> None:
        self.outputs = {}


# ---------------------------------------------------------------------------------------------
# Execution

class Runtime:
    """What a node's `run` sees: the worker's model, the prompt's hidden inputs, progress (and
    the previews the prompt asked for)."""

    def __init__(self, ctx, env, prompt_id: str, prompt: dict, extra_data: dict, send: Callable[[str, dict], None],
                 send_bytes: Callable[[bytes], None] | None = None):
        self.ctx, self.env = ctx, env
        self.prompt_id, self.prompt, self.extra_data = prompt_id, prompt, extra_data
        self.send = send
        self.send_bytes = send_bytes if asks_for_previews(extra_data) else None
        self.node_id: str | None = None
        self.pipelines: list = []

    def pipeline(self, entry):
        pipe = self.ctx.pipeline(entry)
        if all(p is not pipe for p in self.pipelines):
            self.pipelines.append(pipe)
        return pipe

    def progress(self, value: int, total: int, x0: Tensor | None = None, family=None) -> None:
        """A step done (`progress`), then its preview frame when the prompt asked for previews
        and `x0` (the sampler's current estimate, in `family`'s latent space) is given."""
        self.send("progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.node_id})
        if self.send_bytes is not None and x0 is not None:
            image = preview_image(x0, family)
            if image is not None:
                self.send_bytes(preview_frame(image))
        self.ctx.progress(value, total)


def _needed(prompt: dict, outputs: list[str], sigs: Signatures, cache: OutputCache) -> list[str]:
    """The nodes to run or take from the cache, inputs before the nodes that read them; the
    inputs of a cached node are not needed."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(n: str) -> None:
        if n in seen:
            return
        seen.add(n)
        if sigs.key(n) not in cache.outputs:
            for key in sorted(prompt[n]["inputs"]):
                value = prompt[n]["inputs"][key]
                if is_link(value):
                    visit(value[0])
        order.append(n)

    for out in outputs:
        visit(out)
    return order


def execute(ctx, env, prompt_id: str, prompt: dict, extra_data: dict, outputs: list[str], cache: OutputCache,
            send: Callable[[str, dict], None], messages: list,
            send_bytes: Callable[[bytes], None] | None = None) -> tuple[str, dict, dict]:
    """Run a validated prompt in the worker thread. Returns (status_str, outputs' UI, meta).
    `send_bytes`: binary frames to the prompt's client (previews, when the prompt asks)."""

    def add_message(event: str, data: dict, broadcast: bool = False) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        messages.append([event, data])
        send(event, data, broadcast) if broadcast else send(event, data)

    sigs = Signatures(prompt, env)
    rt = Runtime(ctx, env, prompt_id, prompt, extra_data, lambda e, d: send(e, d), send_bytes)
    ui_outputs: dict[str, dict] = {}
    meta: dict[str, dict] = {}
    add_message("execution_start", {"prompt_id": prompt_id})
    cached = [n for n in sorted(prompt, key=_node_order) if _has_key(sigs, n, cache)]
    add_message("execution_cached", {"nodes": cached, "prompt_id": prompt_id})
    values: dict[str, tuple] = {}
    executed: list[str] = []
    current: str | None = None
    try:
        for node_id in _needed(prompt, outputs, sigs, cache):
            current = node_id
            key = sigs.key(node_id)
            node = prompt[node_id]
            cls = NODES[node["class_type"]]
            if key in cache.outputs:
                values[node_id], ui = cache.outputs[key]
            else:
                rt.node_id = node_id
                send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
                ctx.check()
                kwargs = {k: (values[v[0]][v[1]] if is_link(v) else unwrap(v)) for k, v in node["inputs"].items()
                          if _accepts(cls, env, k)}
                result = cls().run(rt, **kwargs)
                ui = None
                if isinstance(result, dict):
                    ui, result = result.get("ui"), tuple(result.get("result", ()))
                values[node_id] = tuple(result)
                cache.outputs[key] = (values[node_id], ui)
                executed.append(node_id)
            if ui is not None:
                ui_outputs[node_id] = ui
                meta[node_id] = {"node_id": node_id, "display_node": node_id, "parent_node": None,
                                 "real_node_id": node_id}
                send("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id})
    except Interrupted:
        add_message("execution_interrupted", {"prompt_id": prompt_id, "node_id": current,
                                              "node_type": prompt[current]["class_type"] if current else None,
                                              "executed": executed}, broadcast=True)
        return "error", ui_outputs, meta
    except Exception as e:  # noqa: BLE001 - reported to the client as ComfyUI does
        if not isinstance(e, SdlabError):
            log.exception("node %s (%s) failed", current, prompt[current]["class_type"] if current else "")
        node = prompt.get(current, {})
        add_message("execution_error", {
            "prompt_id": prompt_id, "node_id": current, "node_type": node.get("class_type"), "executed": executed,
            "exception_message": str(e), "exception_type": type(e).__name__,
            "traceback": traceback.format_tb(e.__traceback__),
            "current_inputs": {k: [v if isinstance(v, (str, int, float, bool)) else repr(v)]
                               for k, v in node.get("inputs", {}).items() if not is_link(v)},
            "current_outputs": list(values)})
        return "error", ui_outputs, meta
    finally:
        # The graph's LoRAs come out of the loaded weights: the next job sees the model as loaded.
        from .nodes import use_loras

        for pipe in rt.pipelines:
            try:
                use_loras(pipe)
            except Exception:  # noqa: BLE001
                log.exception("restoring the weights after a graph failed")
        # Only what this prompt used stays cached (ComfyUI's clean_unused).
        keep = {sigs.key(n) for n in _upstream(prompt, outputs)}
        cache.outputs = {k: v for k, v in cache.outputs.items() if k in keep}
    add_message("execution_success", {"prompt_id": prompt_id})
    return "success", ui_outputs, meta


def _upstream(prompt: dict, outputs: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(outputs)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo += [v[0] for v in prompt[n]["inputs"].values() if is_link(v)]
    return seen


def _has_key(sigs: Signatures, node_id: str, cache: OutputCache) -> bool:
    try:
        return sigs.key(node_id) in cache.outputs
    except (KeyError, TypeError):  # a node outside the validated part of the graph
        return False


def _accepts(cls: type[Node], env, name: str) -> bool:
    return _spec_of(cls, env, name) is not None
