"""Identity headers are taken exactly: X-On-Behalf-Of is trimmed of ASCII spaces and tabs only (a value with a
control character or a non-ASCII space is a 400, never another user's name), a credential or end-user header sent
twice is a 400, and x-portkey-api-key / x-api-key, when sent, is the credential whatever Authorization holds."""

from __future__ import annotations

import httpx
import pytest
from stack import API_KEY, OTHER_API_KEY, chat_lines
from starlette.datastructures import Headers

from api.auth import KeyRing, authenticate, end_user_of
from shared.errors import AuthenticationFailed, InvalidRequest
from shared.settings import Settings

KEYRING = KeyRing.from_settings(Settings(api_keys=f"{API_KEY}=tenant-a,{OTHER_API_KEY}=tenant-b"))


def headers(*pairs: tuple[str, str | bytes]) -> Headers:
    return Headers(raw=[(k.lower().encode(), v if isinstance(v, bytes) else v.encode()) for k, v in pairs])


def error_of(fn, *args) -> InvalidRequest | AuthenticationFailed:
    with pytest.raises((InvalidRequest, AuthenticationFailed)) as err:
        fn(*args)
    return err.value


@pytest.mark.parametrize("sent, seen", [
    ("alice", "alice"),
    ("  alice\t", "alice"),  # ASCII spaces and tabs around the value are not part of it
    ("al ice", "al ice"),
    ("José", "José"),
])
def test_end_user_kept_exactly(sent, seen):
    assert end_user_of(headers(("X-On-Behalf-Of", sent.encode("latin-1")))) == seen


@pytest.mark.parametrize("sent", [
    b"alice\xa0",  # a no-break space, latin-1: was trimmed into "alice" before
    "alice\u00a0".encode(),  # the same in UTF-8 (read as latin-1: "Â" and a no-break space)
    "alice\u3000".encode(),  # an ideographic space in UTF-8 (its bytes read as C1 controls)
    b"\xa0alice",
    b"ali\x7fce",
    b"",
    b" \t ",
    b"a" * 257,
])
def test_end_user_with_invisible_or_control_characters_is_400(sent):
    err = error_of(end_user_of, headers(("X-On-Behalf-Of", sent)))
    assert err.status_code == 400 and err.code == "invalid_end_user" and err.param == "X-On-Behalf-Of"


@pytest.mark.parametrize("name", ["Authorization", "X-On-Behalf-Of", "x-portkey-api-key", "x-api-key"])
def test_a_header_sent_twice_is_400(name):
    value = f"Bearer {API_KEY}" if name == "Authorization" else API_KEY if name.endswith("key") else "alice"
    sent = headers((name, value), (name, value + "x"))
    err = error_of(end_user_of if name == "X-On-Behalf-Of" else lambda h: authenticate(KEYRING, h), sent)
    assert err.status_code == 400 and err.code == "duplicate_header" and err.param == name.lower()


def test_portkey_key_is_the_credential_and_authorization_is_not():
    provider_key = "sk-provider-0123456789abcdef"
    # Portkey's model: the provider's key in Authorization, batchgate's in x-portkey-api-key.
    assert authenticate(KEYRING, headers(("Authorization", f"Bearer {provider_key}"),
                                         ("x-portkey-api-key", API_KEY))) == "tenant-a"
    assert authenticate(KEYRING, headers(("Authorization", f"Bearer {API_KEY}"),
                                         ("x-api-key", OTHER_API_KEY))) == "tenant-b"
    # A valid Bearer does not rescue a wrong x-portkey-api-key, and the 401 never shows the Authorization value.
    err = error_of(authenticate, KEYRING, headers(("Authorization", f"Bearer {API_KEY}"),
                                                  ("x-portkey-api-key", "sk-wrong-portkey-key")))
    assert err.status_code == 401 and "x-portkey-api-key" in err.message
    assert API_KEY[-4:] not in err.message and API_KEY[:3] + "****" + API_KEY[-4:] not in err.message
    # Both carriers with different keys: ambiguous, a 400.
    err = error_of(authenticate, KEYRING, headers(("x-portkey-api-key", API_KEY), ("x-api-key", OTHER_API_KEY)))
    assert err.status_code == 400 and err.code == "conflicting_credentials"
    assert authenticate(KEYRING, headers(("x-portkey-api-key", API_KEY), ("x-api-key", API_KEY))) == "tenant-a"
    assert authenticate(KEYRING, headers(("Authorization", f"Bearer {API_KEY}"))) == "tenant-a"


@pytest.mark.e2e
def test_identity_headers_through_the_running_api(stack):
    """What a user of the running API sees: 400s in OpenAI's envelope, and one user per exact name."""
    root = stack.base_url.removesuffix("/v1")
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=root, timeout=10) as http:
        resp = http.get("/v1/batches", headers=[("Authorization", f"Bearer {API_KEY}"),
                                                 ("Authorization", f"Bearer {OTHER_API_KEY}")])
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "duplicate_header"
        resp = http.get("/v1/files", headers=[*bearer.items(), ("X-On-Behalf-Of", "alice"),
                                              ("X-On-Behalf-Of", "bob")])
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "duplicate_header"
        resp = http.get("/v1/files", headers={**bearer, "X-On-Behalf-Of": b"alice\xa0"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_end_user"
        assert resp.json()["error"]["type"] == "invalid_request_error"

        # alice's file is hers under her exact name, and nobody else's. (Padding is the unit tests' above: the
        # client refuses to send it, and the HTTP parser would strip ASCII spaces and tabs around a value anyway.)
        uploaded = http.post("/v1/files", headers={**bearer, "X-On-Behalf-Of": "alice-ah"},
                             data={"purpose": "batch"}, files={"file": ("a.jsonl", chat_lines(1))})
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        assert http.get(f"/v1/files/{file_id}", headers={**bearer, "X-On-Behalf-Of": "alice-ah"}).status_code == 200
        for other in ("alice-a", "Alice-ah", "alice-ah."):
            assert http.get(f"/v1/files/{file_id}", headers={**bearer, "X-On-Behalf-Of": other}).status_code == 404
