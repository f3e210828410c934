"""Build step for the one native piece: SineReLU's fused CPU loops (deadneuron/torch/_fused.c, docs/sinerelu.md).

Everything else is in pyproject.toml. The extension is optional: where no C compiler works, `pip install` still
succeeds and SineReLU runs its eager path. It uses the CPython API only (no torch headers), so it builds in
milliseconds-to-seconds with the platform's C compiler and needs no torch at build time.
"""

from __future__ import annotations

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -fno-trapping-math lets gcc vectorize the branch select (without it the loop stays scalar, ~15x slower);
# -fno-math-errno and -fopenmp-simd let it call glibc's vector sin/cos; no OpenMP runtime is linked.
UNIX_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        unix = self.compiler.compiler_type != "msvc"
        for extension in self.extensions:
            extension.extra_compile_args = UNIX_FLAGS if unix else ["/O2"]
            extension.extra_link_args = ["-pthread"] if unix else []
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "deadneuron.torch._fused",
            ["deadneuron/torch/_fused.c"],
            libraries=["m"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
