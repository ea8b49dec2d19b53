"""The line's MQTT connections (paho-mqtt): result sinks publish through one, triggers subscribe
through another. ``mqtt://`` or ``mqtts://`` (TLS, checked against ``--mqtt-ca`` or the system's
CAs), ``USER:PASSWORD@`` for credentials, the path is the topic."""

from __future__ import annotations

import urllib.parse

from petah.errors import PetahError


def shown(uri: str) -> str:
    """The URI without its password (for pages, logs and errors); never raises, whatever the URI."""
    parsed = urllib.parse.urlsplit(uri)
    userinfo, at, host = parsed.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return uri
    netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def check_uri(uri: str, what: str) -> None:
    """A broker URI names a host, a port that is a number, and a topic."""
    parsed = urllib.parse.urlsplit(uri)
    try:
        parsed.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise PetahError(f"{what} {shown(uri)!r}: the port is not a number") from None
    if not parsed.hostname:
        raise PetahError(f"{what} {shown(uri)!r}: names no host")
    if not parsed.path.strip("/"):
        raise PetahError(f"{what} {shown(uri)!r}: name the topic, e.g. mqtt://broker:1883/line-1/results")


def topic(uri: str) -> str:
    return urllib.parse.urlsplit(uri).path.strip("/")


class Connection:
    """One paho client kept connected in its own thread (reconnects by itself); ``refused`` says
    why the broker turned it away, ``error`` why it could not connect at all."""

    def __init__(self, uri: str, ca_file: str | None = None, on_connect=None, on_message=None):
        import paho.mqtt.client as mqtt

        parsed = urllib.parse.urlsplit(uri)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if parsed.username is not None:
            self.client.username_pw_set(urllib.parse.unquote(parsed.username),
                                        urllib.parse.unquote(parsed.password or ""))
        if parsed.scheme == "mqtts":
            self.client.tls_set(ca_certs=ca_file)
        self.refused: str | None = None
        self.error: str | None = None
        self._on_connect = on_connect
        self.client.on_connect = self._connected
        self.client.on_connect_fail = self._failed
        if on_message is not None:
            self.client.on_message = on_message
        self.client.reconnect_delay_set(1, 10)
        self.client.connect_async(parsed.hostname, parsed.port or (8883 if parsed.scheme == "mqtts" else 1883), 30)
        self.client.loop_start()

    def _connected(self, client, userdata, flags, reason, properties) -> None:
        self.refused = None if not reason.is_failure else str(reason)
        self.error = None
        if not reason.is_failure and self._on_connect is not None:
            self._on_connect(client)

    def _failed(self, client, userdata) -> None:
        self.error = "it cannot be reached, or TLS failed"

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def why_not(self) -> str:
        why = f"it refused: {self.refused}" if self.refused else self.error
        return f"not connected to the broker{f' ({why})' if why else ''}"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


__all__ = ["Connection", "check_uri", "shown", "topic"]
