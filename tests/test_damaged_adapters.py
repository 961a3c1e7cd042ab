"""LoRA-X Load inside the real ComfyUI host, given damaged adapter files (tests/damage.py).

Each damaged copy of a kohya LoRA for the mini SD1.5 goes into ComfyUI's ``loras`` folder and
through a queued graph (UNETLoader -> LoRA-X Load). ComfyUI must report it as the node's error:
a ``LoraxError`` whose message is the one sentence naming the file (and key) and what is wrong,
never the loader's own exception type; the host then runs the next graph as before. The command
line's side of the same mutations is tests/test_cli.py.
"""

from __future__ import annotations

import pytest
import torch

import damage
import host
from host import ComfyExecutionError

KEYS = [f"input_blocks.1.1.transformer_blocks.0.{a}.{p}.weight" for a in ("attn1", "attn2") for p in ("to_q", "to_v")]


@pytest.fixture(scope="module")
def lora_file(comfy_host, mini_sd15):
    comfy_host.load_pack(host.REPO_ROOT)
    g = torch.Generator().manual_seed(5)
    factors = {k: (torch.randn(mini_sd15[k].shape[0], 4, generator=g) * 0.05,
                   torch.randn(4, mini_sd15[k].shape[1], generator=g) * 0.05) for k in KEYS}
    name = comfy_host.save_lora(host.make_kohya_lora(factors, alpha=2.0), "damage_source.safetensors")
    return comfy_host.folders["loras"] / name


def _load_prompt(unet_name: str, lora_name: str) -> dict:
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["unet", 0], "adapter_name": lora_name,
                                                         "strength": 1.0}},
        "cap": host.capture(["load", 0]),
    }


def test_lorax_load_refuses_every_damaged_adapter_with_a_comfyui_error(comfy_host, mini_sd15_unet_name, lora_file):
    folder = comfy_host.folders["loras"] / "damaged"
    folder.mkdir(exist_ok=True)
    mutations = damage.mutations(lora_file.read_bytes())
    for i, m in enumerate(mutations):
        (folder / f"{i:02d}.safetensors").write_bytes(m.data)
    executor = comfy_host.new_executor()  # one executor: the UNet loads once, as in a running ComfyUI
    refused = set()
    for i, m in enumerate(mutations):
        path = folder / f"{i:02d}.safetensors"
        try:
            out = comfy_host.run_prompt(_load_prompt(mini_sd15_unet_name, f"damaged/{path.name}"), executor=executor)
        except ComfyExecutionError as e:
            details = e.details
            assert details.get("node_type") == "LoraxLoad", (m.kind, str(e))
            assert details.get("exception_type") == "lorax.errors.LoraxError", (m.kind, str(e))
            message = details["exception_message"]
            assert len(message.splitlines()) == 1 and message.startswith(f"file '{path}'"), (m.kind, message)
            for needle in m.needles + ((f"key '{m.key}'",) if m.key else ()):
                assert needle in message, (m.kind, message)
            assert "another architecture" not in message, (m.kind, message)
            refused.add(m.kind)
        else:
            assert not m.must_refuse, f"{m.kind}: LoRA-X Load accepted the damaged file"
            assert out["cap"]["value"][0].patches, m.kind  # a flip that left a working adapter: applied
    assert {m.kind for m in mutations if m.must_refuse} <= refused
    # The host carries on: the intact file loads and patches the model.
    out = comfy_host.run_prompt(_load_prompt(mini_sd15_unet_name, lora_file.name), executor=executor)
    assert len(out["cap"]["value"][0].patches) == len(KEYS)
