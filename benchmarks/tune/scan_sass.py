"""The selective-scan kernels compiled for sm_90 on this machine, no GPU needed: registers, spills and, per loop
of the SASS, the instructions by kind (what the notes' readings of the scan kernels come from). Triton's own
ptxas and cuobjdump do the work; the 2.8B case: bf16 activations, N 16, chunk 64, every optional input.

    python -m benchmarks.tune.scan_sass [--out benchmarks/results/scan_sass.json]
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from blackmamba.kernels import scan_bwd_triton, scan_triton

from ..harness import RESULTS_DIR, argument_parser, run_meta, text_table, write_json

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
BF16_ARGS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr", "du_ptr", "ddelta_ptr", "dz_ptr"}
FLAGS = dict(N=16, N_P2=16, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
FWD = dict(FLAGS, CHUNK=64, HAS_D=True, HAS_H0=False, SAVE_CKPT=True, STORE_Y=True)
BWD = dict(FLAGS, CHUNK=64, HAS_D=True, HAS_DHT=False)
# name -> (kernel, compile-time arguments, num_warps)
KERNELS = {
    "fwd b32": (scan_triton._scan_fwd_lane_kernel, dict(FWD, BLOCK_D=32, PACK=2), 1),
    "fwd b32 carry pass": (scan_triton._scan_fwd_lane_kernel, dict(FWD, BLOCK_D=32, PACK=2, STORE_Y=False), 1),
    "bwd segmented b8": (scan_bwd_triton._scan_bwd_seg_kernel, dict(BWD, BLOCK_D=8, PREFETCH_BC=True), 1),
    "bwd segmented b16": (scan_bwd_triton._scan_bwd_seg_kernel, dict(BWD, BLOCK_D=16, PREFETCH_BC=False), 1),
    "bwd segmented b16 B/C prefetched": (
        scan_bwd_triton._scan_bwd_seg_kernel,
        dict(BWD, BLOCK_D=16, PREFETCH_BC=True),
        1,
    ),
    "bwd carry b8": (scan_bwd_triton._scan_bwd_carry_kernel, dict(FLAGS, BLOCK_D=8), 1),
}
KINDS = ("MUFU", "FFMA", "FMUL", "FADD", "SHFL", "LDG", "STG", "LDS", "STS", "BAR", "LDL", "STL")
_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def compile_sm90(fn, constexprs: dict, num_warps: int) -> bytes:
    signature = {
        a: "constexpr" if a in constexprs else ("*bf16" if a in BF16_ARGS else "*fp32") if a.endswith("_ptr") else "i32"
        for a in fn.arg_names
    }
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["cubin"]


def sass_stats(cubin: bytes) -> dict:
    """Registers, whole-kernel counts of KINDS, and for each loop (a backward branch) its length and counts."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([BIN / "cuobjdump", "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    code = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines() if (m := _LINE.match(line))]

    def count(lines) -> dict[str, int]:
        ops = collections.Counter(op for _, op, _ in lines)
        return {k: ops[k] for k in KINDS}

    loops = []
    for addr, op, line in code:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", line) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            body = [c for c in code if int(target.group(1), 16) <= c[0] <= addr]
            loops.append({"instructions": len(body), **count(body)})
    regs = re.findall(r"REG:(\d+)", res)
    return {"registers": int(regs[0]) if regs else None, "instructions": len(code), **count(code), "loops": loops}


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--out", default=str(RESULTS_DIR / "scan_sass.json"), help="results file")
    args = parser.parse_args(argv)
    stats = {}
    for name, (fn, constexprs, warps) in KERNELS.items():
        stats[name] = sass_stats(compile_sm90(fn, constexprs, warps))
        print(name, {k: v for k, v in stats[name].items() if k != "loops"}, flush=True)
    write_json(Path(args.out), {"meta": run_meta("cpu", target="sm_90"), "kernels": stats})
    header = ["kernel / loop", "regs", "instr", *KINDS]
    body = []
    for name, s in stats.items():
        body.append([name, str(s["registers"]), str(s["instructions"]), *(str(s[k]) for k in KINDS)])
        for i, loop in enumerate(s["loops"]):
            body.append([f"  loop {i}", "", str(loop["instructions"]), *(str(loop[k]) for k in KINDS)])
    print(text_table(header, body))


if __name__ == "__main__":
    main()
