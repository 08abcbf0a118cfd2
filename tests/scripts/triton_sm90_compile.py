"""The compiled (non-interpreted) Triton path, checked without a GPU: a stand-in driver that targets
sm_90. Run by tests/test_triton.py::test_compiled_path_without_gpu in a fresh interpreter with
TRITON_INTERPRET unset and CARAFE_NO_NATIVE=1."""
import re, os, subprocess, tempfile, warnings
import torch, triton
from triton.backends.compiler import GPUTarget

class StandInDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self):
        return torch.device("cpu")
    def get_current_device(self):
        return 0
    def get_current_stream(self, *args):
        return 0

triton.runtime.driver.set_active(StandInDriver())
from carafe_kernels.triton import kernels as kk, ops  # noqa: F401  (registers the triton_ops)
assert not kk.INTERPRET

# 1. torch.compile's view of the triton_ops: forward and backward decompose into the kernels, and
#    the kernels' mutation analysis (from their TTIR) finds exactly the outputs, never the inputs.
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._functorch.aot_autograd import aot_function
from functorch.compile import make_boxed_func
graphs = []
def keep(gm, example_inputs):
    graphs.append(gm.code)
    return make_boxed_func(gm.forward)
for fused, dtype, down in ((True, torch.float32, False), (False, torch.bfloat16, False),
                          (True, torch.float32, True), (False, torch.bfloat16, True)):
    graphs.clear()
    with FakeTensorMode():
        f = torch.empty(2, 4, 3, 5, dtype=dtype, requires_grad=True)
        m_shape = (2, 2 * 9, 2, 3) if down else (2, 2 * 9 * 4, 3, 5) if fused else (2, 2 * 9, 6, 10)
        m = torch.empty(*m_shape, dtype=dtype, requires_grad=True)
        name = "triton_carafe" + ("_down" if down else "") + ("_fused" if fused else "")
        fn = aot_function(lambda a, b: getattr(torch.ops.carafe_kernels, name)(a, b, 3, 2, 2),
                          fw_compiler=keep, bw_compiler=keep)
        fn(f, m).sum().backward()
    code = "\n".join(graphs)
    assert code.count("triton_kernel_wrapper_functional(") == 3, code
    clones = re.findall(r"tensors_to_clone = (\[[^\]]*\])", code)
    # fp32 accumulates in grad_ptr itself; half types in the fp32 dp buffer. lse only when fused.
    want = ["['out_ptr']", "['grad_ptr', 'lse_ptr']" if fused else "['dp_ptr', 'grad_ptr']", "['gfeat_ptr']"]
    assert sorted(clones) == sorted(want), clones

# 2. Every autotune config that the early prune keeps compiles for sm_90 without local-memory spills.
from triton.compiler import ASTSource
ptxas_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
checked = 0
# The down ops (content-aware downsampling) run the forward and mask-gradient kernels with DOWN=True and
# no sub-pixel axis (SS_PAD=1), and their own features-gradient kernel with an S*S phase axis.
for shape in (dict(C=256, G=1, H=64, W=64, K=5, S=2), dict(C=16, G=1, H=16, W=16, K=11, S=8)):
    ss_pad = kk.next_pow2(shape["S"] ** 2)
    for fn, configs, extra, prune in (
            (kk._carafe_fwd, kk._FWD_CONFIGS, {"DOWN": False, "SS_PAD": ss_pad}, kk._fit_configs),
            (kk._carafe_bwd_feat, kk._BWD_FEAT_CONFIGS, {"SS_PAD": ss_pad}, kk._fit_configs),
            (kk._carafe_bwd_mask, kk._BWD_MASK_CONFIGS, {"ACC_IN_GRAD": False, "DOWN": False, "SS_PAD": ss_pad},
             kk._fit_configs),
            (kk._carafe_fwd, kk._FWD_CONFIGS, {"DOWN": True, "SS_PAD": 1}, kk._fit_configs),
            (kk._carafe_bwd_mask, kk._BWD_MASK_CONFIGS, {"ACC_IN_GRAD": False, "DOWN": True, "SS_PAD": 1},
             kk._fit_configs),
            (kk._carafe_down_bwd_feat, kk._BWD_FEAT_CONFIGS, {"SS_PAD": ss_pad}, kk._down_fit_configs)):
        # the two configs with the largest fp32 tile per thread: the ones that could spill
        fitted = [c for c in prune(configs, dict(shape, **extra)) if c.num_stages == 1]
        fitted.sort(key=lambda c: -c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_P"] * extra["SS_PAD"] / c.num_warps)
        for cfg in fitted[:2]:
            consts = dict(K=shape["K"], S=shape["S"], FUSED=True, **extra, **cfg.kwargs)
            sig = {n: "constexpr" if n in consts else
                   ("*fp32" if n in ("lse_ptr", "dp_ptr") else "*bf16") if n.endswith("_ptr") else "i32"
                   for n in fn.arg_names}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                          target=GPUTarget("cuda", 90, 32),
                                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
                fh.write(compiled.asm["cubin"]); fh.flush()
                usage = subprocess.run([os.path.join(ptxas_dir, "cuobjdump"), "--dump-resource-usage", fh.name],
                                       capture_output=True, text=True, check=True).stdout
            local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
            assert local == 0, (fn.__name__, consts, cfg, usage)
            checked += 1
print("checked", checked)
