"""A real RTSP camera for the tests: GStreamer's RTSP server (Debian: gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-{base,good,ugly}, python3-gi) serving a live H.264 test pattern, as an IP
camera does. Run by the system's python3 (where the GObject bindings are):
``python3 tests/rtsp_camera.py PORT [WIDTHxHEIGHT] [FPS]``; prints ``ready`` once it listens."""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402 - after the versions are chosen

Gst.init(None)
port = sys.argv[1]
width, height = (sys.argv[2] if len(sys.argv) > 2 else "64x64").split("x")
fps = sys.argv[3] if len(sys.argv) > 3 else "25"
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
                   f"framerate={fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
                   "! rtph264pay name=pay0 pt=96 )")
factory.set_shared(True)  # one encoder for every client, as a camera has
server.get_mount_points().add_factory("/cam", factory)
if server.attach(None) == 0:
    sys.exit(f"cannot listen on port {port}")
print("ready", flush=True)
GLib.MainLoop().run()
