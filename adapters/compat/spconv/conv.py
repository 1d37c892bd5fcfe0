"""spconv's convolution layers (``spconv/pytorch/conv.py`` of spconv 2.3.8) on sparsevox's convolutions.

Parameters are spconv's: ``weight`` ``[C_out, *kernel_size, C_in]`` ("KRSC", the kernel axes in the order
of the index columns) and ``bias`` ``[C_out]``, so spconv state dicts load unchanged. The core's
``W[r] = weight[:, r, :]^T``, a contiguous ``[K, C_in, C_out]`` tensor, is a view of that parameter: its
memory is stored in the core's order under spconv's shape (:func:`core_strides`), so no copy is made per
call (:meth:`SparseConvolution.sparsevox_weight`). A 1×1 layer (kernel volume 1; for non-SubM layers also stride 1) computes, as spconv's
``conv1x1`` path does, ``features @ weight.view(C_in, C_out)``: the memory of its ``[C_out, 1, 1, 1,
C_in]`` parameter read as ``[C_in, C_out]`` (not its transpose), on the same sites, without pairs.

Output sites, spatial shapes and pairs follow spconv (:mod:`.maps`); ``indice_key`` records and reuses
pairs as spconv does: a regular or transposed layer stores its map under its key, a SubM layer stores or
(when the key exists) reuses one, and an inverse layer runs the stored map of a regular layer or pool
swapped, onto that layer's input indices (in their order, with its spatial shape).
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.nn.init import calculate_gain

from sparsevox.adapters.torch.functional import conv_features

from . import maps
from .core import ConvAlgo, IndiceData, SparseConvTensor, checked_int, checked_nd
from .modules import SparseModule

__all__ = ["SparseConvolution"] + [f"{kind}{nd}d" for nd in (1, 2, 3, 4) for kind in
                                   ("SubMConv", "SparseConv", "SparseConvTranspose", "SparseInverseConv")]

_MAX_NUM_VOXELS_DURING_TRAINING = "max_num_voxels_during_training"


def core_strides(shape) -> tuple[int, ...]:
    """Strides of spconv's weight shape ``[C_out, *kernel_size, C_in]`` laid over the core's contiguous
    ``[K, C_in, C_out]`` memory: the parameter keeps spconv's shape and state-dict keys (values are read and
    copied by index, so spconv checkpoints load; ``.to``, ``deepcopy`` and ``clone`` keep these strides),
    while ``W = weight.reshape(C_out, K, C_in).permute(1, 2, 0)`` is contiguous. What needs a contiguous
    parameter does not take it: ``weight.view(...)`` (use ``.reshape``), ``nn.utils.parameters_to_vector``,
    safetensors' ``save_file`` (save ``{k: v.contiguous()}``)."""
    c_out, *ks, c_in = shape
    inner = [1] * len(ks)
    for i in range(len(ks) - 2, -1, -1):
        inner[i] = inner[i + 1] * ks[i + 1]
    return (1, *(n * c_in * c_out for n in inner), c_out)


def _unsupported_act(act_type) -> bool:
    return act_type is not None and getattr(act_type, "name", str(act_type)).split(".")[-1] != "None_"


class SparseConvolution(SparseModule):
    """spconv's ``SparseConvolution`` (same arguments). Supported: ndim 1, 2, 3; ``subm``, ``transposed``,
    ``inverse``; ``kernel_size``/``stride``/``padding``/``dilation`` (SubM: odd sizes, as spconv),
    ``output_padding`` of transposed layers; ``indice_key``; ``bias``; ``record_voxel_count``. Channels,
    ``kernel_size``, ``stride`` and ``dilation`` must be integers >= 1, ``padding`` and ``output_padding``
    integers (negative ones crop, as in spconv); else ``ValueError`` naming the argument.
    ``algo``, ``fp32_accum`` and ``large_kernel_fast_algo`` are accepted and recorded (sparsevox chooses
    its algorithm itself and accumulates in float32 or wider). Not supported (``NotImplementedError``):
    ndim 4, ``groups != 1`` (spconv neither), fused activations (``act_type``), int8 inputs."""

    __constants__ = ['stride', 'padding', 'dilation', 'groups', 'bias', 'subm', 'inverse', 'transposed',
                     'output_padding']

    def __init__(self, ndim, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, subm=False, output_padding=0, transposed=False, inverse=False, indice_key=None, algo=None,
                 fp32_accum=None, record_voxel_count=False, act_type=None, act_alpha=0, act_beta=0,
                 large_kernel_fast_algo=False, name=None, device=None, dtype=None):
        super().__init__(name=name)
        if ndim not in (1, 2, 3):
            raise NotImplementedError(f"{ndim}D sparse convolutions (SparseConv{ndim}d, SubMConv{ndim}d, ...): "
                                      f"sparsevox.compat.spconv supports 1D, 2D and 3D")
        if groups != 1:
            raise NotImplementedError(f"grouped sparse convolution (groups={groups}): spconv does not support it "
                                      f"either")
        if _unsupported_act(act_type):
            raise NotImplementedError(f"fused activations (act_type={act_type}): apply the activation to "
                                      f"x.features after the layer")
        # checked here, by name: spconv lets 0 and 2.5 through to a ZeroDivisionError, a negative dimension or a
        # truncated size. Stride >= 1 for SubM too, which spconv ignores there: 0 is a mistake, not a setting.
        self.ndim = ndim
        self.in_channels = checked_int("in_channels", in_channels)
        self.out_channels = checked_int("out_channels", out_channels)
        self.kernel_size = checked_nd("kernel_size", ndim, kernel_size, 1)
        self.stride = checked_nd("stride", ndim, stride, 1)
        self.dilation = checked_nd("dilation", ndim, dilation, 1)
        # any integer: spconv crops with negative ones (its output size and pairs, which maps follows); an
        # output size <= 0 is refused in forward (maps.check_output_size)
        self.padding = checked_nd("padding", ndim, padding)
        self.output_padding = checked_nd("output_padding", ndim, output_padding)
        kv, kv_stride = math.prod(self.kernel_size), math.prod(self.stride)
        self.conv1x1 = kv == 1 and (subm or kv_stride == 1)
        if self.conv1x1 and not subm and self.padding != [0] * ndim:
            raise ValueError("padding must be zero for 1x1 conv (k=1,s=1)")
        self.subm, self.transposed, self.inverse, self.groups = subm, transposed, inverse, groups
        self.indice_key = indice_key
        self.record_voxel_count = record_voxel_count
        if algo is None:
            algo = ConvAlgo.MaskImplicitGemm if kv <= (128 if large_kernel_fast_algo else 32) else ConvAlgo.Native
        self.algo, self.fp32_accum = algo, fp32_accum
        self.act_type, self.act_alpha, self.act_beta = act_type, act_alpha, act_beta
        self.weight_shape = [self.out_channels, *self.kernel_size, self.in_channels]
        self.scale, self.zero_point = 1.0, 0
        if record_voxel_count and not subm and not inverse:
            self.register_buffer(_MAX_NUM_VOXELS_DURING_TRAINING, torch.zeros(1, dtype=torch.int32, device=device))
        factory = {"device": device, "dtype": dtype}
        # spconv's shape over the core's memory order (see core_strides): W[r] is a view, no copy per call;
        # 1x1 layers stay contiguous (their path reads weight.reshape(C_in, C_out), spconv's quirk)
        self._core_strides = core_strides(self.weight_shape)
        self.weight = nn.Parameter(torch.zeros(*self.weight_shape, **factory) if self.conv1x1 else
                                   torch.empty_strided(self.weight_shape, self._core_strides, **factory).zero_())
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._load_weight_different_layout)

    def is_inverseable(self):
        return self.indice_key is not None and not self.subm

    def get_max_num_voxels(self):
        return getattr(self, _MAX_NUM_VOXELS_DURING_TRAINING, None)

    def reset_parameters(self):
        """spconv's initialisation: Kaiming-uniform (a = sqrt(5)) with fan_in = C_in · K; bias uniform in
        ±1/sqrt(fan_in)."""
        fan_in = self.in_channels * math.prod(self.kernel_size)
        bound = math.sqrt(3.0) * calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in)
        with torch.no_grad():
            # drawn in index order, as into spconv's contiguous weight: a seed gives spconv's values (uniform_
            # on the strided parameter would fill it in memory order)
            self.weight.copy_(torch.empty(self.weight_shape, dtype=self.weight.dtype, device=self.weight.device)
                              .uniform_(-bound, bound))
            if self.bias is not None:
                self.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def _load_weight_different_layout(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
        name = prefix + _MAX_NUM_VOXELS_DURING_TRAINING
        if self.record_voxel_count and not self.subm and not self.inverse and name not in state_dict:
            state_dict[name] = torch.zeros(1, dtype=torch.int32)
        layout = os.getenv("SPCONV_SAVED_WEIGHT_LAYOUT", "")
        if layout not in ("", "KRSC"):
            raise NotImplementedError(f"SPCONV_SAVED_WEIGHT_LAYOUT={layout}: loading weights saved in another layout "
                                      f"than spconv 2.x's [C_out, *kernel_size, C_in] (KRSC) is not supported; "
                                      f"permute them to KRSC first")

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != [0] * self.ndim:
            s += f", padding={self.padding}"
        if self.dilation != [1] * self.ndim:
            s += f", dilation={self.dilation}"
        if self.output_padding != [0] * self.ndim:
            s += f", output_padding={self.output_padding}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", algo={self.algo}"

    def sparsevox_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``[K, C_in, C_out]``: ``W[r] = weight[:, r, :]^T``, contiguous, differentiable when the weight gets
        a gradient. The layer's own weight is stored in that memory order
        (:func:`core_strides`), so this is a view of it (writes through ``.data`` and the optimiser's steps
        are seen, nothing is copied); under autocast the convolution casts it as it casts native layers'
        weights (in training inside its autograd node: one cast per layer and a float32 weight gradient
        straight from the accumulator; a cast here cost a second cast back in every backward, 41 launches
        per float16 training step). A weight in another memory order (one assigned by the user,
        ``load_state_dict(assign=True)``, ``.to(memory_format=...)``) is copied on every call, under autocast
        straight into the autocast dtype."""
        k = math.prod(self.kernel_size)
        w = self.weight if weight is None else weight
        c_in, c_out = self.in_channels, self.out_channels
        # without a gradient one view op, not reshape + permute (host time per layer on the host-bound
        # inference step); with one, permute's backward is a view where as_strided's scatters into zeros
        viewed = None if w.requires_grad and torch.is_grad_enabled() or list(w.shape) != self.weight_shape \
            else (c_in * c_out, c_out, 1) if w.stride() == self._core_strides \
            else (c_in, 1, k * c_in) if w.is_contiguous() else None  # (as_strided checks no size itself)
        if viewed is not None:
            t = w.as_strided((k, c_in, c_out), viewed)
        else:
            t = w.reshape(c_out, k, c_in).permute(1, 2, 0)
        if t.is_contiguous():
            return t
        # a copy anyway: under autocast made in the convolution's dtype, one launch instead of two
        dt = torch.get_autocast_dtype("cuda") if w.is_cuda and torch.is_autocast_enabled("cuda") else w.dtype
        # (.to() with the weight's own dtype would return the permuted view itself, not a contiguous copy)
        return t.to(dtype=dt, memory_format=torch.contiguous_format) if dt != w.dtype else t.contiguous()

    def forward(self, input: SparseConvTensor, add_input: SparseConvTensor | None = None):
        return self._conv_forward(self.training, input, self.weight, self.bias, add_input, name=self.name,
                                  sparse_unique_name=self._sparse_unique_name, act_type=self.act_type,
                                  act_alpha=self.act_alpha, act_beta=self.act_beta)

    def _conv_forward(self, training: bool, input: SparseConvTensor, weight: torch.Tensor, bias, add_input=None,
                      channel_scale=None, output_scale=None, name=None, sparse_unique_name: str = "", act_type=None,
                      act_alpha=0, act_beta=0):
        """spconv's convolution body with the weight ``[C_out, *kernel_size, C_in]`` and bias ``[C_out]`` (or
        None) given: subclasses that convolve with a derived weight (fake quantisation, grouped layers)
        override ``forward`` and call this. ``training``, ``name`` and ``sparse_unique_name`` are accepted
        as spconv's; int8 scales and fused activations raise ``NotImplementedError``."""
        if channel_scale is not None or output_scale is not None:
            raise NotImplementedError("int8 (quantized) sparse convolution (channel_scale/output_scale) is not "
                                      "supported by sparsevox.compat.spconv")
        if _unsupported_act(act_type):
            raise NotImplementedError(f"fused activations (act_type={act_type}): apply the activation to "
                                      f"x.features after the layer")
        features = input.features
        if features.shape[1] != self.in_channels:
            raise ValueError(f"channel size mismatch: the layer takes {self.in_channels} channels, the input has "
                             f"{features.shape[1]}")
        if input.indices.shape[1] - 1 != self.ndim:
            raise ValueError(f"a {self.ndim}D layer got indices with {input.indices.shape[1] - 1} spatial columns")
        if features.dtype in (torch.qint8, torch.int8):
            raise NotImplementedError("int8 (quantized) sparse convolution is not supported by sparsevox.compat.spconv")
        nd, shape = self.ndim, input.spatial_shape
        if self.subm:
            out_shape = shape
        elif self.transposed:
            out_shape = maps.deconv_output_size(shape, self.kernel_size, self.stride, self.padding,
                                                self.output_padding)
        else:
            out_shape = maps.conv_output_size(shape, self.kernel_size, self.stride, self.padding, self.dilation)
        if self.conv1x1:
            out = torch.mm(features, weight.reshape(self.in_channels, self.out_channels))
            if bias is not None:
                out = out + bias.to(out.dtype)
            out_tensor = input.replace_feature(out)
            out_tensor.spatial_shape = out_shape  # padding may change the spatial shape of a 1x1 layer
            return out_tensor
        indice_dict = input.indice_dict.copy()
        datas = input.find_indice_pair(self.indice_key)
        if self.inverse:
            datas = self._inverse_data(input, datas)
            kmap, outids, out_geom = maps.inverse_map(datas.kmap), datas.indices, datas.in_geom
            built_at = datas.in_version  # (the geometry is of the indices as they were then)
            out_shape = datas.spatial_shape
        elif datas is not None:
            if not self.subm:
                raise ValueError(f"indice_key {self.indice_key!r} already exists in this sparse tensor (only SubM "
                                 f"layers reuse stored indices, spconv's rule)")
            self._check_subm_reuse_valid(input, datas)
            kmap, outids, out_geom = datas.kmap, datas.out_indices, datas.out_geom
            built_at = datas.out_version
        else:
            geom = maps.geometry(input)
            built_at = ...  # (the indices as they are now)
            k3, d3 = maps.lift(self.kernel_size, 1), maps.lift(self.dilation, 1)
            with maps.planned(self, input):
                if self.subm:
                    kmap, outids, out_geom = maps.subm_map(geom, k3, d3), input.indices, geom
                else:
                    maps.check_output_size(out_shape, shape)
                    s3, p3 = maps.lift(self.stride, 1), maps.lift(self.padding, 0)
                    o3 = maps.lift(out_shape, 1)
                    if self.transposed:
                        kmap, rows, out_geom = maps.transposed_map(geom, k3, s3, p3, d3, o3)
                    else:
                        kmap, rows, out_geom = maps.strided_map(geom, k3, s3, p3, d3, o3,
                                                                in_shape=maps.lift(shape, 1))
                    outids = maps.user_rows(rows, nd)
            if self.indice_key is not None:
                indice_dict[self.indice_key] = IndiceData(
                    outids, input.indices, kmap, shape, out_shape, self.subm, self.algo, self.kernel_size,
                    self.stride, self.dilation, self.padding, in_geom=geom, out_geom=out_geom)
        out_features = conv_features(features, self.sparsevox_weight(weight), kmap)  # (casts under autocast)
        if bias is not None:
            out_features = out_features + bias.to(out_features.dtype)
        if not self.subm and not self.inverse and self.record_voxel_count:
            getattr(self, _MAX_NUM_VOXELS_DURING_TRAINING).clamp_(min=int(outids.shape[0]))
        out_tensor = input.replace_feature(out_features)
        out_tensor.indices, out_tensor.indice_dict, out_tensor.spatial_shape = outids, indice_dict, out_shape
        out_tensor._sv_geom = maps.geometry_entry(outids, out_geom, built_at) if out_geom is not None else None
        if add_input is not None:
            out_tensor = out_tensor.replace_feature(out_tensor.features + add_input.features)
        return out_tensor

    def _inverse_data(self, input, datas) -> IndiceData:
        if self.indice_key is None or datas is None:
            raise ValueError(f"inverse convolution: no layer stored indice_key {self.indice_key!r} in this tensor's "
                             f"indice_dict (the regular convolution or pool to invert must run first with that key)")
        if datas.is_subm:
            raise ValueError("inverse conv can only be used with standard conv and pool ops.")
        if self.kernel_size != datas.ksize:
            raise ValueError(f"Inverse with same indice_key must have same kernel size, expect {datas.ksize}, this "
                             f"layer {self.kernel_size}")
        if input.spatial_shape != datas.out_spatial_shape:
            raise ValueError(f"Inverse with same indice_key must have same spatial structure (spatial shape), expect "
                             f"{datas.out_spatial_shape}, input {input.spatial_shape}")
        if input.indices.shape[0] != datas.out_indices.shape[0]:
            raise ValueError(f"Inverse with same indice_key must have same num of indices, expect "
                             f"{datas.out_indices.shape[0]}, input {input.indices.shape[0]}")
        return datas

    def _check_subm_reuse_valid(self, inp, datas) -> None:
        if not datas.is_subm:
            raise ValueError(f"indice_key {self.indice_key!r} holds the pairs of a regular convolution or pool: "
                             f"only support reuse subm indices")
        if self.kernel_size != datas.ksize:
            raise ValueError(f"subm with same indice_key must have same kernel size, expect {datas.ksize}, this "
                             f"layer {self.kernel_size}")
        if self.dilation != datas.dilation:
            raise ValueError(f"subm with same indice_key must have same dilation, expect {datas.dilation}, this "
                             f"layer {self.dilation}")
        if inp.spatial_shape != datas.spatial_shape:
            raise ValueError(f"subm with same indice_key must have same spatial structure, expect "
                             f"{datas.spatial_shape}, input {inp.spatial_shape}")
        if inp.indices.shape[0] != datas.indices.shape[0]:
            raise ValueError(f"subm with same indice_key must have same num of indices, expect "
                             f"{datas.indices.shape[0]}, input {inp.indices.shape[0]}")


def _layer(name: str, nd: int, **fixed):
    """One of spconv's named classes (``SubMConv3d``, ...) with its constructor's signature."""
    what = {"subm": "submanifold", "transposed": "transposed", "inverse": "inverse"}
    kind = next((what[k] for k in fixed), "regular")
    if fixed.get("inverse"):
        def __init__(self, in_channels, out_channels, kernel_size, indice_key, bias=True, algo=None,
                     fp32_accum=None, large_kernel_fast_algo=False, name=None):
            SparseConvolution.__init__(self, nd, in_channels, out_channels, kernel_size, bias=bias, inverse=True,
                                       indice_key=indice_key, algo=algo, fp32_accum=fp32_accum,
                                       large_kernel_fast_algo=large_kernel_fast_algo, name=name)
    elif fixed.get("subm"):  # (spconv's SubM layers take no record_voxel_count: positions as theirs)
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                     bias=True, indice_key=None, algo=None, fp32_accum=None, large_kernel_fast_algo=False, name=None):
            SparseConvolution.__init__(self, nd, in_channels, out_channels, kernel_size, stride, padding, dilation,
                                       groups, bias, indice_key=indice_key, algo=algo, fp32_accum=fp32_accum,
                                       large_kernel_fast_algo=large_kernel_fast_algo, name=name, **fixed)
    else:
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                     bias=True, indice_key=None, algo=None, fp32_accum=None, record_voxel_count=False,
                     large_kernel_fast_algo=False, name=None):
            SparseConvolution.__init__(self, nd, in_channels, out_channels, kernel_size, stride, padding, dilation,
                                       groups, bias, indice_key=indice_key, algo=algo, fp32_accum=fp32_accum,
                                       record_voxel_count=record_voxel_count,
                                       large_kernel_fast_algo=large_kernel_fast_algo, name=name, **fixed)
    doc = f"spconv's ``{name}``: a {nd}D {kind} sparse convolution (see :class:`SparseConvolution`)."
    return type(name, (SparseConvolution,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


for _nd in (1, 2, 3, 4):
    for _kind, _fixed in (("SubMConv", {"subm": True}), ("SparseConv", {}),
                          ("SparseConvTranspose", {"transposed": True}), ("SparseInverseConv", {"inverse": True})):
        globals()[f"{_kind}{_nd}d"] = _layer(f"{_kind}{_nd}d", _nd, **_fixed)
del _nd, _kind, _fixed

DEFAULT_SPARSE_CONV_TYPES = {globals()[n] for n in __all__[1:]}
