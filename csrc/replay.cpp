// The replay of a recorded forward (synq/replay.py) in C++: each step's arguments are
// converted to IValues once, when the plan is built, exactly as torch.ops converts them for
// a call from Python (the schema's types, kwargs and defaults); a replay then pushes them onto
// a stack, fills in the tensors derived from the input, and calls the op through the
// dispatcher. The ops, their order and their arguments are those of the Python replay, so the
// results are the same bits; what goes is the Python around each call (about 3 us of argument
// parsing per op at batch 1, more than a small integer model's kernels take).
#include <torch/extension.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace synq {
namespace {

namespace py = pybind11;

struct ListFill {
  int64_t pos, index, slot;   // element `index` of the list argument at stack position `pos`
};

struct Step {
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;                  // every argument, placeholders included
  std::vector<std::pair<int64_t, int64_t>> dyn;   // (stack position, slot)
  std::vector<ListFill> lists;                    // sorted by pos
  std::vector<std::vector<int64_t>> outs;         // per return: its slots, -1 for none
  std::vector<int64_t> frees;
};

class ReplayPlan {
 public:
  ReplayPlan(int64_t n_slots, std::vector<int64_t> result)
      : n_slots_(n_slots), result_(std::move(result)) {
    TORCH_CHECK(n_slots >= 1, "a plan has at least the input's slot");
    for (int64_t s : result_) check_slot(s);
  }

  // args / kwargs as the recorded call passed them, with a placeholder tensor where a slot
  // goes; dyn: (argument position, slot); lists: (argument position, element, slot).
  void add_step(const std::string& name, const std::string& overload, const py::tuple& args,
                const py::dict& kwargs, std::vector<std::pair<int64_t, int64_t>> dyn,
                std::vector<std::tuple<int64_t, int64_t, int64_t>> lists,
                std::vector<std::vector<int64_t>> outs, std::vector<int64_t> frees) {
    Step st{c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str())};
    const c10::FunctionSchema& schema = st.op.schema();
    torch::jit::ToIValueAllowNumbersAsTensors numbers(true);   // x + 1, as torch.ops allows
    torch::jit::Stack stack = torch::jit::createStackForSchema(
        schema, torch::jit::tuple_slice(args), py::kwargs(kwargs), std::nullopt);
    st.args = std::move(stack);
    const auto n_args = static_cast<int64_t>(st.args.size());
    for (auto [p, s] : dyn) {
      TORCH_CHECK(p >= 0 && p < n_args, name, ": argument position ", p, " out of range");
      check_slot(s);
    }
    st.dyn = std::move(dyn);
    for (auto [p, i, s] : lists) {
      TORCH_CHECK(p >= 0 && p < n_args && st.args[p].isList() && i >= 0 &&
                      i < static_cast<int64_t>(st.args[p].toListRef().size()),
                  name, ": list element (", p, ", ", i, ") out of range");
      check_slot(s);
      st.lists.push_back({p, i, s});
    }
    std::stable_sort(st.lists.begin(), st.lists.end(),
                     [](const ListFill& a, const ListFill& b) { return a.pos < b.pos; });
    TORCH_CHECK(outs.size() <= schema.returns().size(), name, ": more outputs than returns");
    for (const auto& o : outs)
      for (int64_t s : o)
        if (s >= 0) check_slot(s);
    st.outs = std::move(outs);
    for (int64_t s : frees) check_slot(s);
    st.frees = std::move(frees);
    steps_.push_back(std::move(st));
  }

  // Tensors whose version counters must still read `versions` (the model's parameters and
  // buffers, read before the recorded call); run() returns None when one has moved.
  void guard(std::vector<at::Tensor> tensors, std::vector<int64_t> versions) {
    TORCH_CHECK(tensors.size() == versions.size(), tensors.size(), " tensors but ",
                versions.size(), " versions");
    for (const auto& t : tensors)
      TORCH_CHECK(!t.is_inference(), "an inference tensor has no version counter to guard");
    guarded_ = std::move(tensors);
    versions_ = std::move(versions);
  }

  bool current() const {
    for (size_t i = 0; i < guarded_.size(); ++i)
      if (guarded_[i]._version() != versions_[i]) return false;
    return true;
  }

  // The result slots' tensors for input x, or None when `check` and a guarded tensor changed.
  py::object run(const at::Tensor& x, bool check) {
    if (check && !current()) return py::none();
    std::vector<at::Tensor> result;
    {
      py::gil_scoped_release no_gil;
      result = replay(x);
    }
    return py::cast(result);
  }

  int64_t size() const { return static_cast<int64_t>(steps_.size()); }

 private:
  void check_slot(int64_t s) const {
    TORCH_CHECK(s >= 0 && s < n_slots_, "slot ", s, " out of range (", n_slots_, " slots)");
  }

  std::vector<at::Tensor> replay(const at::Tensor& x) {
    std::vector<c10::IValue> env(n_slots_);
    env[0] = x;
    torch::jit::Stack stack;
    for (const Step& st : steps_) {
      stack.assign(st.args.begin(), st.args.end());
      for (auto [p, s] : st.dyn) stack[p] = env[s];
      for (size_t k = 0; k < st.lists.size();) {
        const int64_t p = st.lists[k].pos;
        c10::List<c10::IValue> list = stack[p].toList().copy();   // the plan's own stays
        for (; k < st.lists.size() && st.lists[k].pos == p; ++k)
          list.set(st.lists[k].index, env[st.lists[k].slot]);
        stack[p] = c10::IValue(std::move(list));
      }
      st.op.callBoxed(stack);
      for (size_t r = 0; r < st.outs.size() && r < stack.size(); ++r) {
        const std::vector<int64_t>& o = st.outs[r];
        if (stack[r].isList()) {
          const auto elems = stack[r].toListRef();
          for (size_t i = 0; i < o.size() && i < elems.size(); ++i)
            if (o[i] >= 0) env[o[i]] = elems[i];
        } else if (!o.empty() && o[0] >= 0) {
          env[o[0]] = std::move(stack[r]);
        }
      }
      for (int64_t s : st.frees) env[s] = c10::IValue();
    }
    std::vector<at::Tensor> result;
    result.reserve(result_.size());
    for (int64_t s : result_) {
      TORCH_CHECK(env[s].isTensor(), "the plan's result slot ", s, " holds no tensor");
      result.push_back(env[s].toTensor());
    }
    return result;
  }

  int64_t n_slots_;
  std::vector<int64_t> result_;
  std::vector<Step> steps_;
  std::vector<at::Tensor> guarded_;
  std::vector<int64_t> versions_;
};

}  // namespace

void bind_replay(py::module_& m) {
  py::class_<ReplayPlan>(m, "ReplayPlan")
      .def(py::init<int64_t, std::vector<int64_t>>(), py::arg("n_slots"), py::arg("result"))
      .def("add_step", &ReplayPlan::add_step)
      .def("guard", &ReplayPlan::guard)
      .def("run", &ReplayPlan::run, py::arg("x"), py::arg("check") = true)
      .def("__len__", &ReplayPlan::size);
}

}  // namespace synq
