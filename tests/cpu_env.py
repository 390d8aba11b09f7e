"""XLA settings for the test suite and the processes its tests start.

The suite's programs are tiny and each runs a few steps, so compiling dominates its time on 2 cores. LLVM at
-O0 without its expensive passes compiles them faster and runs them slower. Measured on a 2-core Zen 1 EPYC: a
tiny CRIS train step compiled in 13.5 s instead of 24 s and ran 0.39 s a step instead of 0.14 s; MUMC
pretraining's 600-step test fixture came out even (122 s against 118 s). XLA's HLO passes are the same; only
the machine code differs, and with it float32 rounding. The one check that rounding moved past its tolerance (a
full-size gradient against float64) compiles with the defaults (`optimized_codegen`).
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
