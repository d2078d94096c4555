"""The SIGBUS handler of formats/files.py: a C-callable function (Numba cfunc, cached on disk)
that writes one sentence to stderr and calls _exit(1). Async-signal-safe (write, _exit only) and
needs no GIL, so it works wherever the fault happens, a kernel's worker thread included."""

import numpy as np
import numba
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

MESSAGE = ("amed: a model file was truncated or rewritten while this process was reading it "
           "(a quantize or download running on the same folder?); restart the command once that "
           "has finished.\n")
MSG = np.frombuffer(MESSAGE.encode(), np.uint8)


@intrinsic
def _write_stderr_and_exit(typingctx, ptr_t, n_t):
    def codegen(context, builder, signature, args):
        ptr, n = args
        i32, i64, vp = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
        mod = builder.module
        write = cgutils.get_or_insert_function(mod, ir.FunctionType(i64, [i32, vp, i64]), "write")
        exit_ = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [i32]), "_exit")
        builder.call(write, [i32(2), builder.inttoptr(ptr, vp), n])
        builder.call(exit_, [i32(1)])
        return context.get_dummy_value()
    return types.void(types.intp, types.intp), codegen


@numba.cfunc(types.void(types.int32), cache=True)
def on_sigbus(signo):
    _write_stderr_and_exit(MSG.ctypes.data, MSG.size)
