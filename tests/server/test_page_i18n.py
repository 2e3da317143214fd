"""The page's translation tables (static/i18n.js), read as the JSON they are: no browser needed.

The browser checks (the page in Chinese, switching, remembering) are in test_browser.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parents[2] / "src" / "sdlab" / "server" / "static"


def tables() -> dict[str, dict[str, str]]:
    src = (STATIC / "i18n.js").read_text(encoding="utf-8")
    body = src.split("/* TABLES BEGIN */", 1)[1].split("/* TABLES END */", 1)[0]
    return json.loads(body)


def placeholders(text: str) -> set[str]:
    return set(re.findall(r"\{([A-Za-z0-9_]+)\}", text))


def test_the_tables_are_english_and_simplified_chinese():
    assert list(tables()) == ["en", "zh-CN"]


def test_zh_cn_has_every_key_of_en_and_nothing_else():
    en, zh = tables()["en"], tables()["zh-CN"]
    assert sorted(set(en) - set(zh)) == []
    assert sorted(set(zh) - set(en)) == []
    assert all(isinstance(v, str) and v.strip() for v in zh.values())


def test_each_translation_fills_in_the_same_values():
    en, zh = tables()["en"], tables()["zh-CN"]
    assert {k: placeholders(v) for k, v in zh.items()} == {k: placeholders(en[k]) for k in zh}


def test_chinese_is_chinese():
    """A zh-CN entry equal to its English one is a name both languages write alike (LoRA, VAE,
    ControlNet)."""
    en, zh = tables()["en"], tables()["zh-CN"]
    same = sorted(k for k in en if en[k] == zh[k])
    assert same == ["cn", "lora", "opt.sd_vae"]
    # the community's words for the main controls
    assert zh["negative.placeholder"] == "反向提示词" and zh["steps"].startswith("迭代步数")
    assert zh["cfg"].startswith("提示词引导系数") and zh["denoising"] == "重绘幅度"
    assert zh["scheduler"] == "调度类型" and zh["seed"].startswith("随机种子") and zh["hr"].startswith("高分辨率修复")


@pytest.mark.parametrize("name", ["index.html", "app.js"])
def test_every_key_the_page_names_is_in_the_table(name):
    en = tables()["en"]
    src = (STATIC / name).read_text(encoding="utf-8")
    if name == "index.html":
        keys = set(re.findall(r'data-i18n(?:-title|-placeholder|-aria|-alt)?="([^"]+)"', src))
    else:  # t("key"), pageError("key"), a ternary's keys in t(...), dotted keys, the FIELDS' labels
        keys = set(re.findall(r'\b(?:t|pageError)\(\s*"([^"]+)"', src))
        keys |= {k for pair in re.findall(r'\bt\([^()"]*\?\s*"([^"]+)"\s*:\s*"([^"]+)"', src) for k in pair}
        keys |= set(re.findall(r'"([a-z][a-z_]*(?:\.[A-Za-z0-9_]+)+)"', src))
        keys |= set(re.findall(r'\blabel: "([^"]+)"', src))
        keys = {k for k in keys if not k.endswith(".")}  # "opt." + key: checked by the settings tab's test
    assert len(keys) > 40
    assert sorted(keys - set(en)) == []


def test_every_setting_the_page_acts_on_has_a_label_and_help():
    en = tables()["en"]
    src = (STATIC / "app.js").read_text(encoding="utf-8")
    block = src.split("const OPTION_UI = {", 1)[1].split("};", 1)[0]
    keys = re.findall(r"^\s+(\w+): \{", block, re.M)
    assert keys == ["CLIP_stop_at_last_layers", "randn_source", "sd_noise_schedule", "fp8_storage"]
    assert [k for k in keys if f"opt.{k}" not in en or f"opt.{k}.help" not in en] == []
    # choices that are words are translated; GPU / CPU / NV are names
    choices = re.findall(r'"([^"]+)"', "".join(re.findall(r"choices: \[([^\]]*)\]", block)))
    assert sorted(c for c in choices if f"choice.{c}" not in en) == ["CPU", "GPU", "NV"]
