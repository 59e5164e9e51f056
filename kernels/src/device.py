"""What the kernels ask of the device they run on, instead of assuming one GPU model."""

from __future__ import annotations

import ctypes
import functools

import jax

CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16


@functools.cache
def multiprocessor_count() -> int:
    """The streaming multiprocessors of the first device: jax's `core_count`, else the CUDA driver's
    answer; 1 off the GPU (interpret mode runs one program at a time anyway)."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return 1
    count = getattr(device, "core_count", None)
    if count:
        return int(count)
    cuda = ctypes.CDLL("libcuda.so.1")
    handle, value = ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(handle), device.local_hardware_id) != 0:
        raise RuntimeError(f"the CUDA driver does not answer for {device}: cannot size the kernels' grids")
    if cuda.cuDeviceGetAttribute(ctypes.byref(value), CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, handle) != 0:
        raise RuntimeError(f"the CUDA driver does not give {device}'s multiprocessor count")
    return value.value
