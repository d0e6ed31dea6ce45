"""Workaround for running Triton 3.6 kernels under TRITON_INTERPRET=1 with numpy >= 2.4.

The interpreter turns a loop bound computed from program_id into an index with int() on a one-element
array, which numpy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"). We wrap
its tensor patch so that __index__ goes through .item(). Importing this module is a no-op on the GPU.
"""
from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRET:
    from triton.runtime import interpreter as _interpreter

    if not getattr(_interpreter._patch_lang_tensor, "_index_via_item", False):
        _original_patch = _interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _original_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        _patch_lang_tensor._index_via_item = True
        _interpreter._patch_lang_tensor = _patch_lang_tensor
