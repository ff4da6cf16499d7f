"""A random LoRA adapter on a UNet (through peft), to test code "with a LoRA loaded"."""

import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(pipe_or_unet, rank=4, seed=0, adapter_name="random_lora", target_modules=DEFAULT_TARGETS):
    """Add an active LoRA adapter with seeded random nonzero weights to the UNet, in place.

    ``pipe_or_unet``: a pipeline (its ``.unet`` is used) or a UNet. Uses
    ``unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=...))`` (scale 1)
    on every attention projection, then fills ``lora_A`` (rank, in) and ``lora_B``
    (out, rank) with U(-b, b), b = 1/sqrt(fan_in), from a generator seeded with ``seed``
    (global RNG untouched). Returns ``adapter_name``; ``unet.disable_adapters()`` turns it off.
    """
    from peft import LoraConfig

    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=True)
    cuda = [unet.device.index or 0] if unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # peft draws an init we overwrite below
        unet.add_adapter(config, adapter_name=adapter_name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in unet.modules():
            for part in ("lora_A", "lora_B"):
                layers = getattr(module, part, None)
                if layers is None or adapter_name not in layers:
                    continue
                weight = layers[adapter_name].weight
                bound = weight[0].numel() ** -0.5
                fresh = torch.empty(weight.shape).uniform_(-bound, bound, generator=gen)
                weight.copy_(fresh.to(weight))
    return adapter_name
