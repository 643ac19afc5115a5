"""Quantization schemes as compressed-tensors describes them, so exports load where its formats load.

A scheme is weight-only symmetric integer quantization with one scale per group of
``group_size`` consecutive input channels of each output row (compressed-tensors' ``group``
strategy): ``w8a16`` (int8) and ``w4a16`` (int4, range [-8, 7]). Groups lie along a weight's
input dimension; for an expert's ``down`` projection that is the intermediate channels, which is
why every width a budget can take must be a whole number of groups.
"""

from __future__ import annotations

from dataclasses import dataclass

#: scheme name -> (compressed-tensors preset, weight bits)
SCHEMES = {"w8a16": ("W8A16", 8), "w4a16": ("W4A16", 4)}
#: Group sizes the serving kernels take (vLLM Marlin / fused-MoE: 32, 64, 128).
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantScheme:
    """One of :data:`SCHEMES` with its group size."""

    name: str
    group_size: int

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.name!r}; expected one of {', '.join(SCHEMES)}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}; found {self.group_size}")

    @property
    def bits(self) -> int:
        return SCHEMES[self.name][1]

    def args(self):
        """compressed-tensors' ``QuantizationArgs`` of the weights (its preset, with this group size)."""
        from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

        weights = preset_name_to_scheme(SCHEMES[self.name][0], ["Linear"]).weights
        return weights.model_copy(update={"strategy": "group", "group_size": self.group_size})

    def weight_bytes(self, params: int, scale_bytes: int) -> float:
        """Bytes of ``params`` quantized weights: their codes, and one scale of ``scale_bytes`` per group."""
        return params * self.bits / 8 + params / self.group_size * scale_bytes

    def to_dict(self) -> dict:
        return {"scheme": self.name, "bits": self.bits, "group_size": self.group_size, "symmetric": True,
                "format": "pack-quantized" if self.bits < 8 else "int-quantized"}
