"""The public ops: custom-op definitions in the `synq` namespace, fake kernels, autograd."""
