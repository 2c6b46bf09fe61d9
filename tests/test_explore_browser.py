"""The explorer in a real browser: headless Chromium (the system's, driven by Playwright) goes
from search to a latent to one of its examples to the prompt page and checks what each shows;
then the features-across-layers page of an `mlsae evolution` output."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from explore_fixtures import LAYERS, indexed_world, make_sae, serve

from mlsae.core.config import SourceConfig
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import IndexConfig
from mlsae.explore.index import build_index
from mlsae.explore.server import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (`apt-get install chromium`; CI installs it)",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return indexed_world(tmp_path_factory.mktemp("explore_browser"))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def new_page(browser):
    """A page that may evaluate test predicates despite the app's CSP (no eval)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    return ctx.new_page()


def shown(t: str) -> str:
    """A token as the page draws it (whitespace as ␣ ↵ ⇥)."""
    return t.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def wait_page(page, name: str) -> None:
    page.wait_for_function(f"document.body.dataset.page === {name!r}", timeout=120_000)


def test_search_to_latent_to_example_to_prompt(world, browser, tmp_path) -> None:
    from mlsae.explore.db import IndexDB

    db = IndexDB(world["run"] / "explore.sqlite")
    with serve(create_app(world["run"])) as url:
        page = new_page(browser)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        wait_page(page, "search")
        assert page.locator("#results tr").count() > 1  # the most active latents
        # search by example text: a word of the corpus
        page.fill("#by-text input", "river")
        page.click("#by-text button")
        page.wait_for_function("location.hash.includes('text=river')")
        wait_page(page, "search")
        page.wait_for_selector("#results .latent-link")
        link = page.locator("#results .latent-link").first
        j = int(link.inner_text().lstrip("#"))
        assert "river" in db.q("SELECT text FROM latents WHERE latent=?", (j,))[0][0]
        link.click()
        page.wait_for_function(f"location.hash === '#/latent/0/{j}'")
        wait_page(page, "latent")
        assert page.locator("h2").first.inner_text() == f"Latent {j}"
        lat = db.latent(0, j)
        assert f"active on {lat['n_active']} of" in page.inner_text("main")
        assert page.locator("#layer-dist svg rect").count() >= len(LAYERS)
        examples = page.locator("#top-examples .example")
        top = db.examples(0, j, "top")
        n_pos = len({e["pos"] for e in top})
        assert examples.count() == min(8, n_pos)  # one row per token position
        assert page.locator("#top-examples .layerbar").count() == examples.count()
        first = examples.first
        assert first.locator(".tok.at").inner_text() == shown(top[0]["tokens"][top[0]["at"]])
        assert f"L{top[0]['layer']} · {top[0]['act']:.3f}" in first.locator(".meta").inner_text()
        assert page.locator("#layer-dist svg text.axis").count() >= 2  # axis titles
        page.screenshot(path=str(tmp_path / "latent.png"), full_page=True)
        first.click()  # to the prompt page, with the example's context
        wait_page(page, "prompt")
        page.wait_for_selector("#prompt-tokens .tok")
        assert page.input_value("#prompt-text") == top[0]["prompt"]
        assert page.input_value("#prompt-latent") == str(j)
        # the chosen token is the example's; the live run reproduces the indexed activation
        sel = page.locator("#prompt-tokens .tok.sel")
        assert sel.inner_text() == shown(top[0]["tokens"][top[0]["at"]])
        value = float(re.search(r": ([-0-9.e]+)$", sel.get_attribute("title")).group(1))
        assert value == pytest.approx(top[0]["act"], rel=2e-3, abs=2e-3)
        assert page.locator("#prompt-heatmap td").count() == len(LAYERS) * len(
            page.locator("#prompt-tokens .tok").all()
        )
        assert page.locator("#next-token table").count() >= 2
        # steering from the form
        page.fill("#prompt-steer", str(j))
        page.fill("#prompt-factor", "8")
        page.click("#prompt-run")
        page.wait_for_function("location.hash.includes('factor=8')")
        page.wait_for_selector("text=Biggest changes under steering")
        assert page.input_value("#prompt-text") == top[0]["prompt"]  # the text survives Run
        page.screenshot(path=str(tmp_path / "prompt.png"), full_page=True)
        assert errors == []


def test_features_across_layers_page(world, browser, tmp_path) -> None:
    from mlsae.core.stage_config import EvolutionConfig
    from mlsae.evolution.run import evolution_command

    run = tmp_path / "pl"
    for ly in LAYERS:
        make_sae([ly], seed=ly).save(run / f"layer_{ly:02d}")
    evolution_command(
        run,
        tmp_path / "evo",
        inputs=Inputs.held_out(source=SourceConfig(cache=world["cache"])),
        cfg=EvolutionConfig(min_support=1),
    )
    build_index(
        run,
        inputs=Inputs.held_out(source=SourceConfig(cache=world["cache"])),
        cfg=IndexConfig(top_n=4),
    )
    with serve(create_app(run, evolution=tmp_path / "evo")) as url:
        page = new_page(browser)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/#/graph")
        wait_page(page, "graph")
        start = page.locator("main a.pill").first
        layer, feature = start.inner_text().lstrip("L").split(":")
        start.click()
        page.wait_for_selector("#cy[data-drawn]")
        wait_page(page, "graph")
        assert int(page.get_attribute("#cy", "data-drawn")) >= 2  # it and some neighbours
        assert f"Layer {layer}, feature {feature}" in page.inner_text("#node-panel")
        assert "top tokens" in page.inner_text("#node-panel")  # what the feature is about
        assert "this feature" in page.inner_text("#graph-legend")
        assert page.is_hidden(".sae-pick")  # the graph names its own layers' SAEs
        assert page.locator("#chain tr").count() >= 1 and "features" in page.inner_text(
            "#community"
        )
        page.click("#node-panel a:text('open latent')")
        wait_page(page, "latent")
        assert page.locator("h2").first.inner_text() == f"Latent {feature}"
        assert errors == []


def prompt_url(url: str, **params) -> str:
    import urllib.parse

    return url + "/#/prompt?" + urllib.parse.urlencode({"sae": 0, **params})


@pytest.fixture(scope="module")
def app_url(world):
    with serve(create_app(world["run"], max_tokens=128)) as u:
        yield u


def test_prompt_page_is_centred_on_latents(app_url, browser) -> None:
    page = new_page(browser)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(prompt_url(app_url, text="river stone cloud seven alpha river", layer=1, pos=3))
    wait_page(page, "prompt")
    # no latent given: the strongest one at the chosen token and layer
    strongest = page.locator("#top-at .latent-pick").first.get_attribute("data-latent")
    assert f"Latent {strongest} at layer 1" in page.inner_text("#prompt-out")
    assert page.locator("#prompt-tokens .tok").nth(3).get_attribute("class").endswith("sel")
    # a latent id on the page switches the heatmap in place, keeping token and layer
    other = page.locator("#prompt-latents .latent-pick").nth(1).get_attribute("data-latent")
    page.locator("#prompt-latents .latent-pick").nth(1).click()
    page.wait_for_function(f"location.hash.includes('latent={other}')")
    wait_page(page, "prompt")
    assert f"Latent {other} at layer 1" in page.inner_text("#prompt-out")
    assert "pos=3" in page.evaluate("location.hash")
    # a heatmap cell sets both the token and the layer
    page.locator("#prompt-heatmap tr").nth(3).locator("td").nth(1).click()  # L2, token 1
    page.wait_for_function("location.hash.includes('pos=1') && location.hash.includes('layer=2')")
    wait_page(page, "prompt")
    # Run keeps them
    page.click("#prompt-run")
    wait_page(page, "prompt")
    assert "pos=1" in page.evaluate("location.hash") and page.input_value("#prompt-layer") == "2"
    # the latents x layers table at the token: hover titles and a threshold
    cell = page.locator("#token-latents td").first.get_attribute("title")
    assert re.match(r"token 1 .* · latent \d+ · L0 · activation ", cell)
    rows = page.locator("#token-latents tr").count()
    page.fill("#at-threshold", "1e9")
    assert page.locator("#token-latents").count() == 0 and "no latent above" in page.inner_text(
        "#token-latents-card"
    )
    page.fill("#at-threshold", "0")
    assert page.locator("#token-latents tr").count() == rows
    assert page.locator(".scale .ramp").count() >= 3  # colour scales on the heatmaps
    assert errors == []


def test_long_prompt_stays_within_the_viewport(app_url, world, browser) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["model"])
    text = ("river stone cloud seven alpha " * 20)[:200]
    while len(tok(text)["input_ids"]) > 128:
        text = text[:-1]
    assert len(tok(text)["input_ids"]) == 128
    page = new_page(browser)
    page.goto(prompt_url(app_url, text=text))
    wait_page(page, "prompt")
    assert page.locator("#prompt-tokens .tok").count() == 128
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    assert page.locator("#top-at").is_visible()
    scrolls = "t => t.parentElement.scrollWidth > t.parentElement.clientWidth"
    assert page.locator("#prompt-heatmap").evaluate(scrolls)  # scrolls inside its card
    assert "at most 128 tokens" in page.inner_text("#prompt-count")  # limits shown before Run


def test_errors_clear_old_content_and_stay(app_url, browser) -> None:
    page = new_page(browser)
    page.goto(app_url + "/#/latent/0/5")
    wait_page(page, "latent")
    page.goto(app_url + "/#/latent/0/6?layer=99")
    wait_page(page, "latent-error")
    assert "layer must be between" in page.inner_text("#page-error")
    assert page.locator("#top-examples").count() == 0  # latent 5's page is gone
    assert "Latent 5" not in page.inner_text("main")
    # a failed prompt: the old output and the running state go, the text stays as typed
    page.goto(prompt_url(app_url, text="river stone"))
    wait_page(page, "prompt")
    long = "stone " * 30
    page.fill("#prompt-text", long)
    page.click("#prompt-run")
    wait_page(page, "prompt-error")
    assert "at most 128" in page.inner_text("#page-error")
    assert (
        page.locator("#prompt-tokens").count() == 0 and page.locator("#prompt-running").count() == 0
    )
    assert page.input_value("#prompt-text") == long
    # an empty prompt is refused, not refilled
    page.fill("#prompt-text", "")
    page.click("#prompt-run")
    wait_page(page, "prompt-error")
    assert "the prompt is empty" in page.inner_text("#page-error")
    assert page.input_value("#prompt-text") == ""
    # a search that finds nothing says why
    page.goto(app_url + "/#/search?sae=0&token=zzqqxx")
    wait_page(page, "search")
    assert "no token of the vocabulary" in page.inner_text("#empty-why")


def test_tokens_are_readable(app_url, browser) -> None:
    page = new_page(browser)
    page.goto(prompt_url(app_url, text="a b\n\tcé"))
    wait_page(page, "prompt")
    toks = page.locator("#prompt-tokens .tok").all_inner_texts()
    # the tiny tokenizer has one token per byte: é (C3 A9) is merged where it starts
    assert toks == ["a", "␣", "b", "↵", "⇥", "c", "é", "⟨A9⟩"]
    assert "\ufffd" not in page.inner_text("main")
    assert page.locator("#next-token .tok .ws, #next-token .tok").count() > 0


def test_examples_expand_and_dense_latents_hide(world, browser) -> None:
    from mlsae.explore.db import IndexDB

    db = IndexDB(world["run"] / "explore.sqlite")
    freq = dict(db.q("SELECT latent, freq FROM latents WHERE sae=0"))
    share = sorted(freq.values())[len(freq) // 2]
    with serve(create_app(world["run"], dense=share)) as url:
        page = new_page(browser)
        j = max(freq, key=freq.get)
        page.goto(f"{url}/#/latent/0/{j}")
        wait_page(page, "latent")
        assert page.locator("h2 + .badge.dense").count() == 1
        row = page.locator("#top-examples .example").first
        before = row.locator(".tok").count()
        row.locator("button.expand").click()
        page.wait_for_selector("#top-examples .tokens.expanded")
        assert row.locator(".tok").count() > before
        assert row.locator(".tok.noact").count() > 0  # outside the stored window: no colour
        page.goto(f"{url}/#/search?sae=0")
        wait_page(page, "search")
        n_dense = page.locator("#results tr.is-dense").count()
        assert n_dense > 0
        page.check("input.hide-dense")
        page.wait_for_function("document.querySelectorAll('#results tr.is-dense').length === 0")
        wait_page(page, "search")
        assert "dense hidden" in page.inner_text("#result-count")


def test_steering_at_several_layers(app_url, browser) -> None:
    page = new_page(browser)
    page.goto(prompt_url(app_url, text="river stone cloud", layer=1))
    wait_page(page, "prompt")
    page.fill("#prompt-steer", "3")
    page.fill("#prompt-factor", "2")
    page.select_option("#prompt-steer-where", "all")
    page.fill("#prompt-gen", "3")
    page.click("#prompt-run")
    page.wait_for_function("location.hash.includes('steer_layers=all')")
    wait_page(page, "prompt")
    assert page.locator("#steer-norms tr").count() == 1 + len(LAYERS)
    assert "max activation" in page.inner_text("#steered-dist h3")
    assert page.locator("#steered-dist th").all_inner_texts()[:4] == ["token", "p", "model p", "Δp"]
    assert (
        page.locator("#gen-clean .tok").count() >= 1
        and page.locator("#gen-steered .tok").count() >= 1
    )
    # a chosen set of layers
    page.select_option("#prompt-steer-where", "custom")
    page.fill("#prompt-steer-layers", "0,2")
    page.click("#prompt-run")
    page.wait_for_function("location.hash.includes('steer_layers=0%2C2')")
    wait_page(page, "prompt")
    assert page.locator("#steer-norms td:first-child").all_inner_texts() == ["L0", "L2"]
