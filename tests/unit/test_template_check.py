"""The load-time check of chat templates (mesh.template_check), issue 17: each hostile
construct is refused with its name and line, the real templates we have (SmolLM2's in the
default model, the built-in gemma3 one, gemma-3-270m's file) pass, a hostile tiny GGUF is
refused before llama.cpp reads it, and a CVE-2024-34359-style payload that does run `touch`
under plain Jinja is refused by the check and, with the check skipped, by the sandbox."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jinja2
import pytest

from mesh.errors import InvalidInput, ModelError, UnsafeChatTemplate
from mesh.template_check import MAX_DEPTH, check_chat_template, check_model_templates
from mesh.tokenizer import BUILTIN_CHAT_TEMPLATES, ChatTemplate, TemplateBudget, Tokenizer
from node.engines.llamacpp import LlamaCppEngine
from tests.fixtures.tiny_gguf import SPECS, cve_2024_34359_template, write_tiny_gguf

MESSAGES = [{"role": "user", "content": "hi"}]

# (template, what the refusal must name)
HOSTILE = {
    "a dunder attribute": ("{{ ''.__class__ }}", "'__class__'"),
    "the classic walk": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "'__class__'"),
    "a private attribute": ("{{ messages._x }}", "'_x'"),
    "a dunder key": ("{{ messages[0]['__class__'] }}", "'__class__'"),
    "a dunder key built of two texts": ("{{ messages[0]['__cla' ~ 'ss__'] }}", "'__class__'"),
    "an underscore-free frame attribute": ("{{ messages.gi_frame.f_globals }}", "'gi_frame'"),
    "the method resolution order": ("{{ messages.mro() }}", "'mro'"),
    "format_map": ("{{ '{0.__class__}'.format_map(messages) }}", "'format_map'"),
    "a namespace attribute": ("{% set ns = namespace() %}{% set ns.__dict__ = 1 %}", "'__dict__'"),
    "cycler": ("{{ cycler.__init__ }}", "'cycler'"),
    "a global as a namespace": ("{% set joiner.x = 1 %}", "'joiner'"),
    "joiner": ("{{ joiner() }}", "'joiner'"),
    "lipsum": ("{{ lipsum(10**6) }}", "'lipsum'"),
    "self": ("{{ self }}", "'self'"),
    "config": ("{{ config.items() }}", "'config'"),
    "request": ("{{ request.environ }}", "'request'"),
    "url_for": ("{{ url_for.__globals__ }}", "'url_for'"),
    "the attr filter": ("{{ messages | attr('pop') }}", "'attr'"),
    "pprint": ("{{ raise_exception | pprint }}", "'pprint'"),
    "xmlattr": ("{{ {'a': 1} | xmlattr }}", "'xmlattr'"),
    "filesizeformat": ("{{ 1 | filesizeformat }}", "'filesizeformat'"),
    "random": ("{{ messages | random }}", "'random'"),
    "a filter block": ("{% filter urlize %}x{% endfilter %}", "'urlize'"),
    "a filter by name in map": ("{{ messages | map('attr', '__class__') | list }}", "'attr'"),
    "an attribute by name in map": ("{{ messages | map(attribute='__class__') | list }}", "'__class__'"),
    "a dotted attribute path": ("{{ messages | map(attribute='content.__class__') | list }}", "'__class__'"),
    "an attribute by name in selectattr": ("{{ messages | selectattr('__dict__') | list }}", "'__dict__'"),
    "a filter named at render time": ("{{ messages | map(messages[0].content) | list }}", "render time"),
    "a test by name in select": ("{{ messages | select('callable') | list }}", "'callable'"),
    "an attribute in a format field": ("{{ '{0.__class__}'.format(messages) }}", "'__class__' in a format field"),
    "an attribute in a nested format field": ("{{ '{0:{1.__len__}}'.format(1, messages) }}", "'__len__'"),
    "a positional attribute of groupby": ("{{ messages | groupby('__class__') }}", "'__class__'"),
    "a positional attribute of sort": ("{{ messages | sort(false, false, '_x') }}", "'_x'"),
    "an attribute of sum": ("{{ messages | sum(attribute='__len__') }}", "'__len__'"),
    "an attribute hidden in **": ("{{ messages | sort(**{'attribute': '__class__'}) }}", "by * or **"),
    "an attribute named at render time": ("{{ messages | unique(false, messages[0].content) }}", "render time"),
    "the callable test": ("{{ raise_exception is callable }}", "'callable'"),
    "include": ("{% include 'other' %}", "include"),
    "import": ("{% import 'other' as o %}", "import"),
    "from import": ("{% from 'other' import f %}", "from ... import"),
    "extends": ("{% extends 'other' %}", "extends"),
    "a folded repeat": ("{{ 'x' * 10**10 }}", "folded"),
    "a folded repeat in a set": ("{% set x = ('x' * 1000) * 1000 * 1000 %}", "folded"),
    "a folded power": ("{{ 2 ** (10 ** 10) }}", "folded"),
    "a folded wide filter": ("{{ 'x' | center(10**10) }}", "folded"),
    "a folded printf width": ("{{ '%0999999999d' % 1 }}", "folded"),
    "a folded star width": ("{{ '%*d' | format(10**9, 1) }}", "folded"),
    "many folded values": ("{{ 'x' * 1000000 }}" * 8, "more than"),
    "not Jinja": ("{% for m in messages %}", "not valid Jinja"),
    "deep nesting": ("{{ " + "(" * 200 + "1" + ")" * 200 + " }}", "deeper"),
    "too many nested loops to compile": ("{% for a in messages %}" * 25 + "x" + "{% endfor %}" * 25,
                                         "cannot be compiled"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_each_hostile_construct_is_refused_by_name(case: str) -> None:
    template, named = HOSTILE[case]
    with pytest.raises(UnsafeChatTemplate, match="refused") as refused:
        check_chat_template(template)
    assert named in str(refused.value), str(refused.value)
    assert "\n" not in str(refused.value)
    assert isinstance(refused.value, ModelError)


def test_the_refusal_names_the_line_of_the_first_problem() -> None:
    template = "{% for m in messages %}\n{{ m.content }}\n{{ m.__class__.__mro__ }}{{ self }}\n{% endfor %}"
    with pytest.raises(UnsafeChatTemplate, match=r"line 3: it reads the attribute '__class__'"):
        check_chat_template(template, name="tokenizer.chat_template of x.gguf")


def test_nesting_over_the_bound_is_refused() -> None:
    # `a + b + c` nests to the left, one level a term, and Jinja parses it without recursing.
    check_chat_template("{{ messages" + " + messages" * (MAX_DEPTH - 10) + " }}")
    with pytest.raises(UnsafeChatTemplate, match=f"more than {MAX_DEPTH} levels"):
        check_chat_template("{{ messages" + " + messages" * (MAX_DEPTH + 5) + " }}")


def test_a_template_over_the_size_bound_is_refused_and_one_under_passes() -> None:
    body = "{{ messages[0].content }}" + "x" * 2000
    check_chat_template(body, max_bytes=4096)
    with pytest.raises(UnsafeChatTemplate, match="2025 bytes long, more than 2000"):
        check_chat_template(body, max_bytes=2000)


BENIGN = [
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}{% endfor %}",
    "{{ messages[0]['content'].strip().split('\\n')[0].upper() }}{{ messages[0].get('name', 'x') }}",
    "{% for k, v in messages[0].items() %}{{ k }}={{ v }}{% endfor %}",
    "{{ '-' * 40 }}{{ '%s: %d' % ('a', 3) }}{{ '{} says'.format('x') }}{{ 'x' | center(9) }}",
    "{% set ns = namespace(found=false) %}{% for m in messages %}{% set ns.found = true %}{% endfor %}"
    "{{ loop is defined }}{{ ns.found }}",
    "{% macro turn(role) %}<{{ role }}>{{ caller() }}{% endmacro %}{% call turn('user') %}x{% endcall %}",
    "{% if tools is defined and tools %}{{ tools | tojson(indent=2) }}{% endif %}{{ enable_thinking }}",
    "{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(', ') }}",
    "{{ messages | rejectattr('tool_calls', 'defined') | list | length }}{{ range(3) | list }}",
    "{% filter upper %}{{ bos_token }}{% endfilter %}{{ raise_exception('no') if false }}",
    "{% generation %}{{ eos_token }}{% endgeneration %}{{ strftime_now('%Y') }}{{ dict(a=1) }}",
    "{{ message.tool_calls[0].function.arguments | tojson }}{% set message = messages[-1] %}",
    "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}",
    "{{ '{0.role}: {0[content]}'.format(messages[0]) }}{{ messages | groupby('role') | list }}",
    "{{ messages | map('replace', '_', ' ') | list }}{{ messages | sort(attribute='role') | first }}",
]


@pytest.mark.parametrize("template", BENIGN)
def test_plain_chat_template_constructs_pass(template: str) -> None:
    check_chat_template(template)


def test_the_real_templates_we_have_pass(default_model: Path, gemma3_model: Path) -> None:
    check_model_templates(default_model)  # SmolLM2's own template
    check_model_templates(gemma3_model)  # no template of its own...
    check_chat_template(BUILTIN_CHAT_TEMPLATES["gemma3"])  # ...so the built-in one


def _hostile_model(directory: Path, templates: dict[str, str | list[str]]) -> Path:
    return write_tiny_gguf(directory / "hostile.gguf", SPECS[0], chat_templates=templates)


def test_a_compile_time_bomb_is_refused_before_llama_cpp_reads_the_file(tmp_path: Path) -> None:
    # llama-cpp-python's Llama() would fold this into 10 GB while compiling the template: the
    # refusal coming at once (and naming the file) shows the check runs first.
    model = _hostile_model(tmp_path, {"tokenizer.chat_template": "{{ 'x' * 10**10 }}"})
    started = time.monotonic()
    with pytest.raises(UnsafeChatTemplate, match=r"tokenizer.chat_template of hostile.gguf .* folded"):
        Tokenizer.load(model)
    with pytest.raises(UnsafeChatTemplate, match="folded"):
        LlamaCppEngine(model, n_ctx=64, threads=1, slots=1)
    assert time.monotonic() - started < 5.0


def test_every_template_in_the_file_is_checked(tmp_path: Path) -> None:
    # llama.cpp compiles the named templates too (tokenizer.chat_template.<name>), not only the default.
    model = _hostile_model(tmp_path, {"tokenizer.chat_template": "{{ messages[0].content }}",
                                      "tokenizer.chat_template.tool_use": "{{ self.__init__ }}"})
    with pytest.raises(UnsafeChatTemplate, match=r"tokenizer.chat_template.tool_use of hostile.gguf .*'self'"):
        check_model_templates(model)


def test_a_template_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    # llama.cpp would print the array as text ("[\"{{ ... }}\"]") and compile that.
    model = _hostile_model(tmp_path, {"tokenizer.chat_template": ["{{ cycler.__init__ }}"]})
    with pytest.raises(UnsafeChatTemplate, match="not a string"):
        check_model_templates(model)


def test_an_oversized_template_in_a_file_is_refused_by_its_length(tmp_path: Path) -> None:
    model = _hostile_model(tmp_path, {"tokenizer.chat_template": "{{ bos_token }}" + "x" * 5000})
    with pytest.raises(UnsafeChatTemplate, match="5015 bytes long, more than 4096"):
        check_model_templates(model, max_bytes=4096)
    check_model_templates(model, max_bytes=8192)


def test_the_cve_payload_runs_under_plain_jinja_and_nowhere_here(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    payload = cve_2024_34359_template(canary)
    # The payload is real: unsandboxed Jinja (what llama-cpp-python did before 0.2.72) runs it.
    jinja2.Environment().from_string(payload).render(messages=MESSAGES)
    assert canary.exists()
    canary.unlink()
    with pytest.raises(UnsafeChatTemplate, match=r"line 3: it reads the attribute '__class__'"):
        check_chat_template(payload)
    with pytest.raises(UnsafeChatTemplate, match="'__class__'"):
        Tokenizer.load(_hostile_model(tmp_path, {"tokenizer.chat_template": payload}))
    # With the check skipped, the renderer's sandbox refuses it on its own.
    with pytest.raises(InvalidInput, match="chat template"):
        ChatTemplate(payload, bos_token="", eos_token="", budget=TemplateBudget()).render(MESSAGES)
    assert not canary.exists()


def test_the_renderer_gives_templates_no_globals_beyond_the_checked_ones() -> None:
    # A name read before the template sets it passes the check (which does not order reads and
    # writes); the renderer has no such global, so the read finds nothing.
    template = ChatTemplate("{{ cycler is defined }} {{ joiner is defined }} {{ lipsum is defined }}"
                            "{% set cycler = 1 %}{% set joiner = 1 %}{% set lipsum = 1 %}",
                            bos_token="", eos_token="")
    check_chat_template(template.source)
    assert template.render(MESSAGES) == "False False False"


def test_from_json_renders_as_in_llama_cpp() -> None:
    # DeepSeek's templates parse tool-call arguments with it (a filter of llama.cpp's renderer),
    # in a branch: llama-cpp-python, which lacks it, compiles them as long as it stays there.
    source = "{% set a = messages[0].content %}{% if a is string %}{% set a = a | from_json %}{% endif %}{{ a.city }}"
    check_chat_template(source)
    template = ChatTemplate(source, bos_token="", eos_token="")
    assert template.render([{"role": "assistant", "content": '{"city": "Paris"}'}]) == "Paris"
    with pytest.raises(UnsafeChatTemplate, match=r"cannot be compiled: .*from_json"):
        check_chat_template("{{ messages[0].content | from_json }}")


@pytest.mark.skipif(not os.environ.get("EDGEMESH_TEMPLATE_CORPUS"),
                    reason="set EDGEMESH_TEMPLATE_CORPUS to a directory of real .jinja chat templates")
def test_every_real_template_in_a_local_corpus_passes() -> None:
    # For example llama.cpp's models/templates, in the llama-cpp-python sdist (vendor/llama.cpp):
    # nothing is downloaded or kept in the repository; the check is run over what is there.
    corpus = sorted(Path(os.environ["EDGEMESH_TEMPLATE_CORPUS"]).glob("*.jinja"))
    assert corpus, "no .jinja files there"
    refused = {}
    for path in corpus:
        try:
            check_chat_template(path.read_text(encoding="utf-8"), path.name)
        except UnsafeChatTemplate as exc:
            refused[path.name] = str(exc)
    assert not refused, refused
