"""Build the one compiled module, pmq._journal; all other metadata is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

journal = Extension(
    "pmq._journal",
    ["src/pmq/_journal.pyx"],
    include_dirs=["src/pmq", "src/pmq/_vendor/xxhash"],
    define_macros=[("XXH_INLINE_ALL", "1")],
)

setup(
    ext_modules=cythonize(
        [journal],
        compiler_directives={"language_level": 3, "embedsignature": True},
    )
)
