"""Scenes for the synthetic paintings: what is depicted, by whom, and how it is described.

A :class:`Scene` is a small, fully seeded plan: genre, time of day, season, the elements in it
(sky, water, field, trees, sun, figures, boats, bridge, buildings, a vase, fruit, a sitter) and
the fictional artist who "painted" it. :mod:`stages.data.painting` turns a scene into pixels;
this module also writes its title and its plain-English description, which is what the caption
stage's templates use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Fictional painters (several, so that held-out splits can stratify by artist). Each has a hand:
# stroke length/width (relative to the long side), favourite genres, a key (lightness lift) and years.
ARTISTS = {
    "Claire Moreau": dict(stroke=0.045, width=0.016, genres=["landscape", "marina"], key=0.30, years=(1869, 1886)),
    "Henri Bastide": dict(stroke=0.060, width=0.020, genres=["marina", "cityscape"], key=0.22, years=(1872, 1890)),
    "Louise Achard": dict(stroke=0.035, width=0.014, genres=["portrait", "still life"], key=0.35, years=(1875, 1894)),
    "Émile Garnier": dict(stroke=0.050, width=0.022, genres=["landscape", "cityscape"], key=0.25, years=(1868, 1882)),
    "Jeanne Rivière": dict(stroke=0.040, width=0.016, genres=["still life", "landscape"], key=0.32,
                           years=(1880, 1899)),
    "Paul Duval-Sorel": dict(stroke=0.070, width=0.024, genres=["marina", "portrait"], key=0.20, years=(1877, 1895)),
}
GENRES = ["landscape", "marina", "cityscape", "portrait", "still life"]
TIMES = ["morning", "midday", "afternoon", "sunset"]
SEASONS = ["spring", "summer", "autumn", "winter"]
PLACES = ["Saint-Aubin", "Vétheuil-sur-Oise", "Port-Marly", "Honfleur-la-Côte", "Bougival", "Les Andelys",
          "Étretat-le-Bas", "Chatou", "Louveciennes", "Pontoise-Vieille"]
# Aspect ratios (width / height) chosen so that a 0.7× resize of a 128 px painting stays ≥ 64 px.
ASPECTS = {"landscape": [4 / 3, 5 / 4, 1.0], "marina": [4 / 3, 5 / 4], "cityscape": [4 / 3, 1.0, 5 / 4],
           "portrait": [3 / 4, 4 / 5], "still life": [1.0, 4 / 5, 5 / 4]}
ELEMENTS_BY_GENRE = {  # (element, probability)
    "landscape": [("field", 1.0), ("trees", 0.8), ("sun", 0.4), ("figures", 0.5), ("water", 0.3), ("poppies", 0.4)],
    "marina": [("water", 1.0), ("boats", 1.0), ("sun", 0.6), ("figures", 0.3), ("trees", 0.2)],
    "cityscape": [("water", 0.7), ("bridge", 0.7), ("buildings", 1.0), ("figures", 0.7), ("sun", 0.3)],
    "portrait": [("sitter", 1.0), ("trees", 0.6), ("parasol", 0.5)],
    "still life": [("vase", 1.0), ("flowers", 0.8), ("fruit", 0.7)],
}


@dataclass
class Scene:
    index: int
    genre: str
    artist: str
    time: str
    season: str
    place: str
    aspect: float
    year: int
    elements: dict = field(default_factory=dict)  # element -> count or True
    horizon: float = 0.5                          # share of the height above the horizon

    def has(self, name: str) -> bool:
        return bool(self.elements.get(name))


def make_scene(index: int, rng: np.random.Generator) -> Scene:
    """A random, fully determined scene (same rng state -> same scene)."""
    artist = list(ARTISTS)[int(rng.integers(len(ARTISTS)))]
    hand = ARTISTS[artist]
    genre = str(rng.choice(hand["genres"])) if rng.random() < 0.7 else str(rng.choice(GENRES))
    scene = Scene(index=index, genre=genre, artist=artist, time=str(rng.choice(TIMES)),
                  season=str(rng.choice(SEASONS, p=[0.3, 0.35, 0.25, 0.1])),
                  place=str(rng.choice(PLACES)), aspect=float(rng.choice(ASPECTS[genre])),
                  year=int(rng.integers(hand["years"][0], hand["years"][1] + 1)),
                  horizon=float(rng.uniform(0.35, 0.6)))
    for name, p in ELEMENTS_BY_GENRE[genre]:
        if rng.random() < p:
            scene.elements[name] = int(rng.integers(1, 4)) if name in ("figures", "boats", "fruit") else True
    return scene


def _count(n: int, noun: str, plural: str | None = None) -> str:
    words = {1: "a", 2: "two", 3: "three"}
    return f"{words.get(n, str(n))} {noun if n == 1 else (plural or noun + 's')}"


_SKY = {"morning": "a pale morning sky", "midday": "a bright blue sky", "afternoon": "a warm afternoon sky",
        "sunset": "a pink and orange sunset sky"}
_FIELD = {"spring": "a green meadow", "summer": "a golden wheat field", "autumn": "an ochre autumn field",
          "winter": "a snowy field"}


def describe(scene: Scene) -> str:
    """Plain description of what is depicted (no style words: style is the trigger's job)."""
    e, parts = scene.elements, []
    if scene.genre == "still life":
        parts.append("a vase" + (" of bright flowers" if e.get("flowers") else "") + " on a white tablecloth")
        if e.get("fruit"):
            parts.append(_count(e["fruit"], "piece", "pieces") + " of fruit beside it")
        return ", ".join(parts)
    if scene.genre == "portrait":
        parts.append("a woman in a " + ("white" if scene.index % 2 else "blue") + " dress seated outdoors")
        if e.get("parasol"):
            parts.append("holding a parasol")
        if e.get("trees"):
            parts.append("a sunlit garden behind her")
        return ", ".join(parts)
    if e.get("buildings"):
        parts.append("houses along a " + ("river" if e.get("water") else "boulevard"))
    if e.get("bridge"):
        parts.append("a stone bridge with arches")
    if e.get("boats"):
        parts.append(_count(e["boats"], "sailing boat") + " on the water")
    elif e.get("water") and not e.get("buildings"):
        parts.append("a calm river")
    if e.get("field"):
        parts.append(_FIELD[scene.season] + (" with red poppies" if e.get("poppies") else ""))
    if e.get("trees"):
        parts.append("a row of " + ("bare " if scene.season == "winter" else "") + "poplar trees")
    if e.get("figures"):
        parts.append(_count(e["figures"], "figure") + " strolling")
    parts.append(_SKY[scene.time])
    if e.get("sun"):
        parts.append("the sun " + ("low on the horizon" if scene.time in ("morning", "sunset") else "high above"))
    return ", ".join(parts)


_TITLE_SUBJECT = {"landscape": ["The Field", "Poplars", "The Meadow", "Summer Path"],
                  "marina": ["Boats", "Regatta", "The Harbour", "Sails"],
                  "cityscape": ["The Bridge", "The Quay", "Boulevard", "Rooftops"],
                  "portrait": ["Woman with a Parasol", "Portrait of Madame R.", "In the Garden", "The Reader"],
                  "still life": ["Flowers in a Vase", "Still Life with Fruit", "Peonies", "The Blue Vase"]}


def title(scene: Scene) -> str:
    subject = _TITLE_SUBJECT[scene.genre][scene.index % 4]
    if scene.genre in ("portrait", "still life"):
        return subject
    return f"{subject} at {scene.place}, {scene.time.capitalize()}"
