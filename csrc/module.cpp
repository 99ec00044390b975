// The Python module synq_kernels._C. Importing it runs the kernels' static registrations with
// the dispatcher (ops.cpp, cpu/, cuda/); the module itself holds only the C++ replay plan
// (replay.cpp), which synq.replay uses to run a recorded forward without Python between ops.
#include <torch/extension.h>

namespace synq {
void bind_replay(pybind11::module_& m);
}

PYBIND11_MODULE(_C, m) { synq::bind_replay(m); }
