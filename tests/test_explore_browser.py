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
from mlsae.core.stage_config import IndexConfig
from mlsae.explore.index import build_index
from mlsae.explore.server import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
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
        top = db.examples(0, j, "top")[:8]
        assert examples.count() == len(top)
        first = examples.first
        assert first.locator(".tok.at").inner_text() == top[0]["tokens"][top[0]["at"]]
        assert f"L{top[0]['layer']} · {top[0]['act']:.3f}" in first.locator(".meta").inner_text()
        page.screenshot(path=str(tmp_path / "latent.png"), full_page=True)
        first.click()  # to the prompt page, with the example's context
        wait_page(page, "prompt")
        page.wait_for_selector("#prompt-tokens .tok")
        assert page.input_value("#prompt-text") == top[0]["prompt"]
        assert page.input_value("#prompt-latent") == str(j)
        # the chosen token is the example's; the live run reproduces the indexed activation
        sel = page.locator("#prompt-tokens .tok.sel")
        assert sel.inner_text() == top[0]["tokens"][top[0]["at"]]
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
        page.screenshot(path=str(tmp_path / "prompt.png"), full_page=True)
        assert errors == []


def test_features_across_layers_page(world, browser, tmp_path) -> None:
    from mlsae.core.stage_config import EvolutionConfig
    from mlsae.evolution.run import evolution_command

    run = tmp_path / "pl"
    for ly in LAYERS:
        make_sae([ly], seed=ly).save(run / f"layer_{ly:02d}")
    evolution_command(run, tmp_path / "evo", source=SourceConfig(cache=world["cache"]),
                      cfg=EvolutionConfig(min_support=1))  # fmt: skip
    build_index(run, source=SourceConfig(cache=world["cache"]), cfg=IndexConfig(top_n=4))
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
        assert page.locator("#chain tr").count() >= 1 and "features" in page.inner_text(
            "#community"
        )
        page.click("#node-panel a:text('open latent')")
        wait_page(page, "latent")
        assert page.locator("h2").first.inner_text() == f"Latent {feature}"
        assert errors == []
