"""Several ``--served-model-name`` and ``--api-key`` values, as vLLM and LMDeploy users set them: every name
is listed and answers, each key opens the API, any other key is refused - seen through the openai SDK and
litellm."""

from __future__ import annotations

import litellm
import openai
import pytest

from .conftest import API_KEY

NAMES = ["tiny-1B", "internvl2-1b"]
SECOND_KEY = "second-key"
SERVER_OPTIONS = {"served_model_name": NAMES, "api_key": [API_KEY, SECOND_KEY]}

# litellm's lazily imported GitHub Copilot provider defines a TypedDict pydantic warns about (not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Item.* using the `ReadOnly` qualifier:UserWarning")


def test_every_name_is_listed(client):
    assert [m.id for m in client.models.list().data] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_name_answers(client, name):
    answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert answer.model == name


@pytest.mark.parametrize("key", [API_KEY, SECOND_KEY])
def test_every_key_opens_the_api(base_url, key):
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        assert client.chat.completions.create(model=NAMES[1], messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2).choices


def test_another_key_is_refused(base_url):
    with openai.OpenAI(base_url=base_url, api_key="not-a-key", max_retries=0) as client, \
            pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_litellm_with_the_second_name_and_key(base_url):
    response = litellm.completion(model=f"openai/{NAMES[1]}", api_base=base_url, api_key=SECOND_KEY, num_retries=0,
                                  messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert isinstance(response.choices[0].message.content, str)
