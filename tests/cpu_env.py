"""XLA settings for the test suite and the processes its tests start.

The suite's programs are tiny and each runs a few steps, so compiling dominates its time on 2 cores. LLVM at
-O0 without its expensive passes compiles them ~45% faster (a tiny CRIS train step: 24 s -> 13 s) and runs
them slower (0.14 -> 0.39 s a step), a net gain for every test but the long training ones, which it leaves
about even. XLA's HLO passes are unchanged (only LLVM's codegen differs), so results agree to rounding.
"""
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


# XLA:CPU's defaults (DebugOptions), for a check of float32 accuracy against float64 at full size.
OPTIMIZED_CODEGEN = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}


def optimized_codegen(jitted, *args):
    """jitted(*args), compiled with XLA's default codegen whatever the suite's flags."""
    return jitted.lower(*args).compile(compiler_options=OPTIMIZED_CODEGEN)(*args)
