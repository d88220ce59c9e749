"""Every parameter check of GenerationRequest: each names parameter, limit and value."""

from __future__ import annotations

import warnings
from typing import Any

import attrs
import pytest

import dreamo_async as d

PNG_URL = "https://example.com/a.png"


def make(**overrides: Any) -> d.GenerationRequest:
    params: dict[str, Any] = {"prompt": "a cat", "images": [PNG_URL]}
    params.update(overrides)
    return d.GenerationRequest(**params)


def test_minimal_request_defaults_to_multi_ip() -> None:
    request = make()
    assert request.model == d.MULTI_IP_MODEL
    assert request.uses_urls_only


@pytest.mark.parametrize(
    ("overrides", "parameter", "fragment"),
    [
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": 12}, "prompt", "must be a string"),
        ({"model": "dall-e"}, "model", "'dall-e'"),
        ({"images": []}, "images", "1-5 reference images; got 0"),
        ({"images": [PNG_URL] * 6}, "images", "1-5 reference images; got 6"),
        ({"model": "spark_dreamo", "images": [PNG_URL] * 2}, "images", "exactly 1"),
        ({"ref_types": ["IP", "ID"]}, "ref_types", "one entry per image (1); got 2"),
        ({"ref_types": ["FACE"]}, "ref_types[0]", "IP, ID, STYLE, AUTO"),
        ({"ref_types": "IP"}, "ref_types", "got the string"),
        ({"guidance_scale1": 0.5}, "guidance_scale1", "between 1 and 7; got 0.5"),
        ({"guidance_scale1": 7.01}, "guidance_scale1", "got 7.01"),
        ({"guidance_scale2": float("nan")}, "guidance_scale2", "got nan"),
        ({"guidance_scale2": "2"}, "guidance_scale2", "must be a number"),
        ({"guidance_scale2": True}, "guidance_scale2", "must be a number"),
        ({"ddim_steps": 0}, "ddim_steps", "between 1 and 50; got 0"),
        ({"ddim_steps": 51}, "ddim_steps", "got 51"),
        ({"ddim_steps": 12.0}, "ddim_steps", "must be an integer"),
        ({"seed": -2}, "seed", "got -2"),
        ({"seed": 2**31}, "seed", "between -1 and 2147483647"),
        ({"width": 511}, "width", "between 512 and 2048; got 511"),
        ({"height": 2049}, "height", "got 2049"),
        ({"swap_face": 1}, "swap_face", "True or False"),
        ({"use_rephraser": "yes"}, "use_rephraser", "True or False"),
        ({"rephraser_level": "ultra"}, "rephraser_level", "general, fine, coarse"),
    ],
)
def test_each_bad_parameter_is_refused_by_name(
    overrides: dict[str, Any], parameter: str, fragment: str
) -> None:
    with pytest.raises(d.InvalidRequestError) as info:
        make(**overrides)
    assert info.value.parameter == parameter
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_width_times_height_cap_holds_even_with_wider_side_limits() -> None:
    wide = attrs.evolve(d.DEFAULT_LIMITS, max_output_side=4096)
    make(width=2048, height=2048, limits=wide)
    make(width=4096, limits=wide, height=1024)
    with pytest.raises(d.InvalidRequestError, match="got 4096 x 1328 = 5439488") as info:
        make(width=4096, limits=wide)  # the missing side counts as the service default 1328
    assert info.value.parameter == "width"


def test_enums_and_plain_strings_are_both_accepted() -> None:
    request = make(
        images=[PNG_URL, PNG_URL], ref_types=["ip", d.RefType.ID], rephraser_level="fine"
    )
    assert request.ref_types == (d.RefType.IP, d.RefType.ID)
    assert request.rephraser_level is d.RephraserLevel.FINE


def test_long_prompt_warns_by_default_and_policy_can_refuse_or_silence() -> None:
    long_prompt = "x" * 301
    with pytest.warns(d.DreamOWarning, match="301 characters"):
        make(prompt=long_prompt)
    strict = attrs.evolve(d.DEFAULT_LIMITS, prompt_policy="error")
    with pytest.raises(d.InvalidRequestError, match="recommends about 300"):
        make(prompt=long_prompt, limits=strict)
    quiet = attrs.evolve(d.DEFAULT_LIMITS, prompt_policy=d.CheckPolicy.OFF)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(prompt=long_prompt, limits=quiet)


def test_hard_prompt_cap_when_configured() -> None:
    capped = attrs.evolve(d.DEFAULT_LIMITS, max_prompt_chars=10, prompt_policy="off")
    with pytest.raises(d.InvalidRequestError, match="at most 10 characters; got 11"):
        make(prompt="x" * 11, limits=capped)


def test_request_is_frozen() -> None:
    request = make()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.prompt = "other"  # type: ignore[misc]


def test_limits_validate_themselves() -> None:
    with pytest.raises(ValueError, match="min_images"):
        d.Limits(min_images=3, max_images=2)
    with pytest.raises(ValueError, match="positive"):
        d.Limits(max_image_bytes=0)
