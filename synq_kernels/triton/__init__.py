"""Triton kernels. Importing a module here registers its "triton" backend; on CPU tensors the
kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before import)."""
