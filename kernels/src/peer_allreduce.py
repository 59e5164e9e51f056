"""An all-reduce (and all-gather) over NVLink peer memory as a plain Pallas Triton kernel, so it
stays in XLA's CUDA graph.

Why: under jax 0.11 XLA runs each tensor-parallel all-reduce as a collective thunk (NCCL or its
own Triton collective kernel) that ends the step's CUDA graph, and takes several times what NVLink
needs for the bytes (RESULTS.md, "An all-reduce kernel that stays in XLA's CUDA graph"). A
`pallas_call` lowered through Triton is an ordinary kernel to XLA and is captured like any fusion.

How (one shot, push): every device owns a receive buffer and a flag array that live outside any
XLA program (`PeerBuffers`); the kernel reaches them, and the peers', by raw address through
inline PTX, since with peer access between the GPUs of one process every device address is valid
on every device. Program p of device `me`:
  1. stores its tiles of the partial sum into each peer's receive buffer, row `me`;
  2. after a block barrier, raises its flag on each peer (a system-scope fence, then the store);
  3. waits until each peer's program p has raised its flag here;
  4. sums the peers' tiles and its own in device order (so every device gets the same bits) in
     float32 and stores the result; or, as an all-gather, stores every device's tiles as they are.
Flags carry a sequence number (`seq`) that callers increase by one from each all-reduce to the
next, so nothing needs resetting, and its parity picks one of two buffer slots: a device writes
slot s again only after the all-reduce in between (the other slot) has synchronised it with every
peer, by which time every peer has finished reading slot s. Every all-reduce must run on all
devices of the mesh (it is SPMD: call it under `shard_map`), in the same order.

Why the spin-wait does not deadlock, however wide the grid: a program's number is not its
`program_id` but a ticket it takes from a counter on its own device when it starts (`_take_ticket`),
so numbers go to programs in the order they start; ticket t waits only for the programs holding
ticket t on the peers. By induction on t: once every ticket below t has finished on every device,
a device that has not handed out ticket t yet runs only holders of lower tickets, so a
multiprocessor frees up and the next program to start there takes t; then the holders of t are
running on every device, each raises its flags before it waits, and all finish. Residency is never
assumed (a test runs a grid four times the multiprocessors); the grid is still kept to one program
per multiprocessor (`PeerLayout.max_programs`) because that is fastest. The program that takes the
last ticket resets the counter: every ticket of the call is taken by then, and the next kernel on
the device starts only after this one ends.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.pallas.triton import lowering as triton_lowering  # to register an impure inline-asm op
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith
from jax._src.lib.triton import dialect as tt_dialect
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minisgl_jax.utils import cdiv

from .device import multiprocessor_count

# 16-byte vectors per program and loop step: the fewest (a power of two) that spread the input over
# max_programs programs, so that every SM has a program and a large input more loads in flight
# per thread instead of more steps.
MIN_BLOCK_QUADS, MAX_BLOCK_QUADS = 128, 2048
SLOTS = 2

# --- an elementwise inline-asm op the compiler must keep and keep in order ------------------------
# Pallas's own `elementwise_inline_asm` is marked pure: Triton and LLVM may drop, hoist or reorder
# it, which is wrong for stores to peer memory and for spinning on a flag.
_asm_p = Primitive("peer_allreduce_asm")
_asm_p.multiple_results = True


@_asm_p.def_abstract_eval
def _asm_abstract_eval(*avals, asm: str, constraints: str, outputs: int):
    del asm, constraints
    return [jax.core.ShapedArray(avals[0].shape, jnp.int32)] * outputs


@triton_lowering.register_lowering(_asm_p)
def _asm_lowering(ctx, *args, asm: str, constraints: str, outputs: int):
    del outputs
    result_types = [mlir.aval_to_ir_type(ctx.context.mlir_ctx, aval) for aval in ctx.avals_out]
    op = tt_dialect.elementwise_inline_asm(result_types, asm, constraints=constraints, pure=False,
                                           packed_element=1, args=args)
    return list(op) if isinstance(op, (list, tuple, ir.OpResultList)) else [op]


_ticket_p = Primitive("peer_allreduce_ticket")


@_ticket_p.def_abstract_eval
def _ticket_abstract_eval(lo, hi, *, index: int):
    del lo, hi, index
    return jax.core.ShapedArray((), jnp.int32)


@triton_lowering.register_lowering(_ticket_p)
def _ticket_lowering(ctx, lo, hi, *, index: int):
    """One atomic add on a scalar address: Triton runs it in one thread and broadcasts the result.
    The word index is static: a literal operand would reach this rule as an array, not an IR value."""
    del ctx
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    base = arith.ori(arith.shli(arith.extui(i64, hi), arith.constant(i64, 32)), arith.extui(i64, lo))
    address = arith.addi(base, arith.constant(i64, 4 * index))
    pointer = tt_dialect.int_to_ptr(tt_dialect.PointerType.get(i32, 1), address)
    return tt_dialect.atomic_rmw(i32, tt_dialect.RMWOp.ADD, pointer, arith.constant(i32, 1),
                                 sem=tt_dialect.MemSemantic.RELAXED, scope=tt_dialect.MemSyncScope.GPU)


def _take_ticket(lo: jax.Array, hi: jax.Array, index: int) -> jax.Array:
    """This program's number: the counter at word `index` of (lo, hi), then one more."""
    return _ticket_p.bind(lo, hi, index=index)


def _asm(asm: str, constraints: str, *args: jax.Array, outputs: int = 1) -> list[jax.Array]:
    shape = jnp.broadcast_shapes((1,), *(jnp.shape(a) for a in args))
    args = [jnp.broadcast_to(jnp.asarray(a, jnp.int32), shape) for a in args]
    return _asm_p.bind(*args, asm=asm, constraints=constraints, outputs=outputs)


# Every address is a device's base address (two 32-bit halves) plus a 32-bit word index.
_ADDRESS = "mov.b64 %ar_a, {$LO, $HI};\nmul.wide.u32 %ar_o, $IDX, 4;\nadd.s64 %ar_a, %ar_a, %ar_o;\n"


def _address(lo: int, hi: int, idx: int) -> str:
    return _ADDRESS.replace("$LO", f"${lo}").replace("$HI", f"${hi}").replace("$IDX", f"${idx}")


_STORE_V4 = (  # out, lo, hi, word index, predicate, 4 words
    "{\n.reg .b64 %ar_a, %ar_o;\n.reg .pred %ar_p;\n" + _address(1, 2, 3)
    + "setp.ne.b32 %ar_p, $4, 0;\n@%ar_p st.global.v4.b32 [%ar_a], {$5, $6, $7, $8};\nmov.b32 $0, 0;\n}"
)
_STORE_IF = (  # out, lo, hi, word index, predicate, word
    "{\n.reg .b64 %ar_a, %ar_o;\n.reg .pred %ar_p;\n" + _address(1, 2, 3)
    + "setp.ne.b32 %ar_p, $4, 0;\n@%ar_p st.global.b32 [%ar_a], $5;\nmov.b32 $0, 0;\n}"
)
_LOAD_V4 = (  # 4 words out, lo, hi, word index
    "{\n.reg .b64 %ar_a, %ar_o;\n" + _address(4, 5, 6) + "ld.global.cg.v4.b32 {$0, $1, $2, $3}, [%ar_a];\n}"
)
_SIGNAL = (  # out, lo, hi, word index, value
    "{\n.reg .b64 %ar_a, %ar_o;\n" + _address(1, 2, 3)
    + "fence.acq_rel.sys;\nst.relaxed.sys.global.b32 [%ar_a], $4;\nmov.b32 $0, 0;\n}"
)
_WAIT = (  # out, lo, hi, word index, value
    "{\n.reg .b64 %ar_a, %ar_o;\n.reg .b32 %ar_v;\n.reg .pred %ar_p;\n" + _address(1, 2, 3)
    + "ar_wait_${:uid}:\nld.acquire.sys.global.b32 %ar_v, [%ar_a];\nsetp.ne.b32 %ar_p, %ar_v, $4;\n"
    + "@%ar_p bra ar_wait_${:uid};\nmov.b32 $0, 0;\n}"
)


# --- the buffers every device owns, outside any XLA program --------------------------------------
def peer_access_unsupported(devices: list[jax.Device]) -> str | None:
    """Why these GPUs cannot read and write each other's memory (None when every pair can).

    Asked of the CUDA driver: a kernel touching a peer it cannot reach would fault, not fail cleanly.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        return f"the CUDA driver library is not loadable ({err})"
    if cuda.cuInit(0) != 0:
        return "cuInit failed"
    handles = []
    for device in devices:
        handle = ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(handle), device.local_hardware_id) != 0:
            return f"cuDeviceGet({device.local_hardware_id}) failed"
        handles.append(handle)
    for i, a in enumerate(handles):
        for j, b in enumerate(handles):
            can = ctypes.c_int()
            if i != j and (cuda.cuDeviceCanAccessPeer(ctypes.byref(can), a, b) != 0 or not can.value):
                return f"GPU {devices[i].id} cannot access GPU {devices[j].id}'s memory (no peer access)"
    return None


@dataclass(frozen=True)
class PeerLayout:
    """Static sizes the kernel is compiled for: devices, receive capacity (words), flags per slot."""

    num_devices: int
    capacity_words: int
    max_programs: int  # the device's multiprocessors: a program each at most, each looping over its blocks

    @property
    def comm_words(self) -> int:
        return SLOTS * self.num_devices * self.capacity_words

    @property
    def flag_words(self) -> int:
        return SLOTS * self.num_devices * self.max_programs + 1  # the last word: the ticket counter

    @property
    def ticket_word(self) -> int:
        return self.flag_words - 1


class PeerBuffers:
    """Each device's receive buffer and flags, and the address table the kernel reads them by.

    `table` is [devices, devices, 5] int32 sharded over the mesh axis: device d's row i describes
    device (d + i) % devices: receive buffer address (low, high 32 bits), flags address (low, high),
    and that device's index. The buffers must outlive every program that uses the table; they are
    never passed to XLA, so their addresses never change.
    """

    def __init__(self, mesh: Mesh, axis: str, capacity_bytes: int, max_programs: int | None = None) -> None:
        devices = list(mesh.devices.flat)
        if mesh.devices.size != mesh.shape[axis]:
            raise ValueError(f"PeerBuffers needs a mesh over axis {axis!r} only, got axes {dict(mesh.shape)}")
        n = len(devices)
        block_words = 4 * MAX_BLOCK_QUADS
        capacity = cdiv(capacity_bytes, 4 * block_words) * block_words
        self.layout = PeerLayout(num_devices=n, capacity_words=capacity,
                                 max_programs=max_programs or multiprocessor_count())
        sharding = NamedSharding(mesh, P(axis))
        self.comm = jax.device_put(np.zeros((n, self.layout.comm_words), np.int32), sharding)
        self.flags = jax.device_put(np.zeros((n, self.layout.flag_words), np.int32), sharding)
        jax.block_until_ready((self.comm, self.flags))
        address: dict[int, tuple[int, int]] = {}
        for comm, flags in zip(self.comm.addressable_shards, self.flags.addressable_shards):
            address[comm.device.id] = (comm.data.unsafe_buffer_pointer(), flags.data.unsafe_buffer_pointer())
        table = np.zeros((n, n, 5), np.uint32)
        for d in range(n):
            for i in range(n):
                j = (d + i) % n
                comm_addr, flag_addr = address[devices[j].id]
                table[d, i] = (comm_addr & 0xFFFFFFFF, comm_addr >> 32, flag_addr & 0xFFFFFFFF, flag_addr >> 32, j)
        self.table = jax.device_put(table.view(np.int32), sharding)


# --- the kernel -----------------------------------------------------------------------------------
def _unpack(words: jax.Array, dtype: jnp.dtype) -> list[jax.Array]:
    """int32 words -> float32 values: two bfloat16 (low half first) or one float32 per word."""
    if dtype == jnp.float32:
        return [lax.bitcast_convert_type(words, jnp.float32)]
    low = lax.bitcast_convert_type(lax.shift_left(words, 16), jnp.float32)
    high = lax.bitcast_convert_type(words & jnp.int32(-65536), jnp.float32)
    return [low, high]


def _pack(values: list[jax.Array], dtype: jnp.dtype) -> jax.Array:
    """The inverse of `_unpack`, rounding float32 to the nearest even bfloat16 (NaN stays NaN)."""
    bits = [lax.bitcast_convert_type(v, jnp.int32) for v in values]
    if dtype == jnp.float32:
        return bits[0]
    rounded = [b + 0x7FFF + (lax.shift_right_logical(b, 16) & 1) for b in bits]
    rounded = [jnp.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, r) for b, r in zip(bits, rounded)]
    return lax.shift_right_logical(rounded[0], 16) | (rounded[1] & jnp.int32(-65536))


def _kernel(seq_ref, table_ref, words_ref, out_ref, *, layout: PeerLayout, num_quads: int, block: int,
            num_blocks: int, programs: int, dtype: jnp.dtype | None):
    n, cap = layout.num_devices, layout.capacity_words
    seq = seq_ref[0]
    slot = seq & 1
    me = table_ref[0, 0, 4]
    comm = [(table_ref[0, i, 0], table_ref[0, i, 1]) for i in range(n)]
    flags = [(table_ref[0, i, 2], table_ref[0, i, 3]) for i in range(n)]
    program = _take_ticket(flags[0][0], flags[0][1], layout.ticket_word)

    # The last ticket of this call is taken: the next call counts from 0.
    (token,) = _asm(_STORE_IF, "=r,r,r,r,r,r", flags[0][0], flags[0][1], layout.ticket_word,
                    (program == programs - 1).astype(jnp.int32), 0)

    steps = cdiv(num_blocks, programs)
    lanes = jnp.arange(block, dtype=jnp.int32)

    def quads_of(step):
        quads = (program + step * programs) * block + lanes
        return quads, quads < num_quads

    def load_local(quads, valid):
        clamped = jnp.where(valid, quads, 0)
        return [plgpu.load(words_ref.at[clamped * 4 + c]) for c in range(4)]

    def push(step, token):
        quads, valid = quads_of(step)
        local = load_local(quads, valid)
        row = (slot * n + me) * cap
        for i in range(1, n):
            (done,) = _asm(_STORE_V4, "=r,r,r,r,r,r,r,r,r", comm[i][0], comm[i][1], row + quads * 4 + token,
                           valid.astype(jnp.int32), *local)
            token = token + jnp.max(done)
        return token

    token = lax.fori_loop(0, steps, push, jnp.max(token))
    plgpu.debug_barrier()
    flag = (slot * n + me) * layout.max_programs + program
    for i in range(1, n):
        (done,) = _asm(_SIGNAL, "=r,r,r,r,r", flags[i][0], flags[i][1], flag + token, seq)
        token = token + done
    for i in range(1, n):
        src = lax.rem(me + i, n)
        (done,) = _asm(_WAIT, "=r,r,r,r,r", flags[0][0], flags[0][1],
                       (slot * n + src) * layout.max_programs + program + token, seq)
        token = token + done

    def reduce(step, token):
        quads, valid = quads_of(step)
        local = load_local(quads, valid)
        total = None
        for src in range(n):  # device order, the same on every device
            received = _asm(_LOAD_V4, "=r,=r,=r,=r,r,r,r", comm[0][0], comm[0][1],
                            (slot * n + src) * cap + quads * 4 + token, outputs=4)
            words = [jnp.where(me == src, local[c], received[c]) for c in range(4)]
            if dtype is None:  # all-gather: device src's words go to row src as they are
                for c in range(4):
                    plgpu.store(out_ref.at[jnp.where(valid, (src * num_quads + quads) * 4 + c, n * num_quads * 4)],
                                words[c], mask=valid)
                continue
            values = [_unpack(w, dtype) for w in words]
            total = values if total is None else [[a + b for a, b in zip(t, v)] for t, v in zip(total, values)]
        if total is not None:
            for c in range(4):
                plgpu.store(out_ref.at[jnp.where(valid, quads * 4 + c, num_quads * 4)], _pack(total[c], dtype),
                            mask=valid)
        return token

    lax.fori_loop(0, steps, reduce, token)


def peer_all_reduce_unsupported(
    shape: tuple[int, ...], dtype: jnp.dtype, layout: PeerLayout | None = None
) -> str | None:
    """Why `peer_all_reduce` cannot sum an array of this shape and dtype (None when it can), in
    buffers of `layout` (None: buffers sized for it)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float32"
    size = int(np.prod(shape))
    if size == 0 or size % 8:
        return f"{size} elements is not a positive multiple of 8"
    if layout is not None and size * jnp.dtype(dtype).itemsize > 4 * layout.capacity_words:
        return f"{size} elements exceed the receive buffers' {4 * layout.capacity_words} bytes"
    return None


def peer_all_reduce(x: jax.Array, table: jax.Array, seq: jax.Array, *, layout: PeerLayout) -> jax.Array:
    """Sum `x` over the devices of `layout`; call per shard under `shard_map`, on every device.

    table: this device's [1, devices, 5] rows of `PeerBuffers.table`; seq: int32 [1], equal on all
    devices, one more than the previous all-reduce's (wrapping), never 0 (the flags' initial value).
    """
    dtype = jnp.dtype(x.dtype)
    if dtype == jnp.bfloat16:
        words = lax.bitcast_convert_type(x.reshape(-1, 2), jnp.int32)
    else:
        words = lax.bitcast_convert_type(x.reshape(-1), jnp.int32)
    if words.size > layout.capacity_words:
        raise ValueError(f"peer_all_reduce: {x.shape} needs {words.size} words, buffers hold {layout.capacity_words}")
    out = _call(words.size, layout, dtype)(seq, table, words)
    if dtype == jnp.bfloat16:
        return lax.bitcast_convert_type(out, jnp.bfloat16).reshape(x.shape)
    return lax.bitcast_convert_type(out, jnp.float32).reshape(x.shape)


def peer_all_gather(x: jax.Array, table: jax.Array, seq: jax.Array, *, layout: PeerLayout) -> jax.Array:
    """Every device's `x` (int32 or float32), stacked in device order: [devices, *x.shape]; bits as
    they are. Called like `peer_all_reduce`, and numbered in the same sequence as it."""
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.int32), jnp.dtype(jnp.float32)):
        raise ValueError(f"peer_all_gather takes int32 or float32, got {jnp.dtype(x.dtype).name}")
    words = lax.bitcast_convert_type(x, jnp.int32).reshape(-1)
    padded = cdiv(max(words.size, 1), 4) * 4  # whole 16-byte vectors
    if padded > layout.capacity_words:
        raise ValueError(f"peer_all_gather: {x.shape} needs {padded} words, buffers hold {layout.capacity_words}")
    out = _call(padded, layout, None)(seq, table, jnp.pad(words, (0, padded - words.size)))
    out = out.reshape(layout.num_devices, padded)[:, : words.size]
    return lax.bitcast_convert_type(out, x.dtype).reshape(layout.num_devices, *x.shape)


@functools.lru_cache(maxsize=None)
def _call(num_words: int, layout: PeerLayout, dtype: jnp.dtype | None):
    """The kernel for `num_words` int32 words: summed as `dtype`, or gathered when `dtype` is None."""
    gather = dtype is None
    num_quads = num_words // 4
    block = MIN_BLOCK_QUADS
    while block < MAX_BLOCK_QUADS and block * layout.max_programs < num_quads:
        block *= 2
    num_blocks = cdiv(num_quads, block)
    programs = min(num_blocks, layout.max_programs)
    kernel = functools.partial(_kernel, layout=layout, num_quads=num_quads, block=block, num_blocks=num_blocks,
                               programs=programs, dtype=dtype)
    return pl.pallas_call(
        kernel,
        grid=(programs,),
        out_shape=jax.ShapeDtypeStruct((num_words * (layout.num_devices if gather else 1),), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=min(16, max(4, block // 128)), num_stages=1),
        name="peer_all_gather" if gather else "peer_all_reduce",
    )
