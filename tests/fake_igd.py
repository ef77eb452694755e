"""A small UPnP Internet Gateway Device for the NAT lab's router: SSDP, description, SOAP.

Why not miniupnpd (it installs from the registry): miniupnpd 2.3 refuses every mapping while
its external address is in a reserved range ("private/reserved address ... is not suitable for
external IP", then UPnPError 501), and the lab's internet must be a documentation range
(203.0.113.0/24, shared/notes/netlab.md). So the lab runs this gateway instead: it answers the
same UPnP IGD calls miniupnpc makes (SSDP M-SEARCH, the device description, GetStatusInfo,
GetExternalIPAddress, GetSpecificPortMappingEntry, AddPortMapping, DeletePortMapping) and
installs a *real* iptables DNAT rule per mapping, so the router really forwards the port.

    python tests/fake_igd.py LAN_IP WAN_IP WAN_IFACE      (inside the router's namespace)
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SSDP_GROUP, SSDP_PORT = "239.255.255.250", 1900
HTTP_PORT = 49000
UUID = "uuid:5f1e2d3c-shoal-lab-igd-000000000001"
WANIP = "urn:schemas-upnp-org:service:WANIPConnection:1"

DESCRIPTION = f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><specVersion><major>1</major><minor>0</minor>
</specVersion><device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<friendlyName>shoal lab gateway</friendlyName><UDN>{UUID}</UDN><deviceList><device>
<deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType><UDN>{UUID}-wan</UDN>
<serviceList><service>
<serviceType>urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId><controlURL>/ctl/CmnIfCfg</controlURL>
<eventSubURL>/evt/CmnIfCfg</eventSubURL><SCPDURL>/WANCfg.xml</SCPDURL></service></serviceList>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<UDN>{UUID}-conn</UDN><serviceList><service><serviceType>{WANIP}</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>/ctl/IPConn</controlURL>
<eventSubURL>/evt/IPConn</eventSubURL><SCPDURL>/WANIPCn.xml</SCPDURL></service></serviceList>
</device></deviceList></device></deviceList></device></root>"""


class Gateway:
    def __init__(self, lan_ip: str, wan_ip: str, wan_iface: str) -> None:
        self.lan_ip, self.wan_ip, self.wan_iface = lan_ip, wan_ip, wan_iface
        self.mappings: dict[int, tuple[str, int]] = {}
        self.lock = threading.Lock()

    def _dnat(self, action: str, port: int, client: str, internal: int) -> None:
        subprocess.run(
            ["iptables", "-t", "nat", action, "PREROUTING", "-i", self.wan_iface, "-p", "tcp",
             "--dport", str(port), "-j", "DNAT", "--to-destination", f"{client}:{internal}"],
            check=True,
        )  # fmt: skip

    def soap(self, action: str, args: dict[str, str]) -> tuple[int, str]:
        if action == "GetStatusInfo":
            return 200, (
                "<NewConnectionStatus>Connected</NewConnectionStatus>"
                "<NewLastConnectionError>ERROR_NONE</NewLastConnectionError><NewUptime>1</NewUptime>"
            )
        if action == "GetExternalIPAddress":
            return 200, f"<NewExternalIPAddress>{self.wan_ip}</NewExternalIPAddress>"
        if action == "GetConnectionTypeInfo":
            return 200, (
                "<NewConnectionType>IP_Routed</NewConnectionType>"
                "<NewPossibleConnectionTypes>IP_Routed</NewPossibleConnectionTypes>"
            )
        port = int(args.get("NewExternalPort", "0"))
        with self.lock:
            if action == "GetSpecificPortMappingEntry":
                if port not in self.mappings:
                    return 500, _fault(714, "NoSuchEntryInArray")
                client, internal = self.mappings[port]
                return 200, (
                    f"<NewInternalPort>{internal}</NewInternalPort>"
                    f"<NewInternalClient>{client}</NewInternalClient><NewEnabled>1</NewEnabled>"
                    "<NewPortMappingDescription>shoal</NewPortMappingDescription>"
                    "<NewLeaseDuration>0</NewLeaseDuration>"
                )
            if action == "AddPortMapping":
                client, internal = args["NewInternalClient"], int(args["NewInternalPort"])
                if port in self.mappings and self.mappings[port] != (client, internal):
                    return 500, _fault(718, "ConflictInMappingEntry")
                if port not in self.mappings:
                    self._dnat("-A", port, client, internal)
                    self.mappings[port] = (client, internal)
                return 200, ""
            if action == "DeletePortMapping":
                if port not in self.mappings:
                    return 500, _fault(714, "NoSuchEntryInArray")
                client, internal = self.mappings.pop(port)
                self._dnat("-D", port, client, internal)
                return 200, ""
        return 500, _fault(401, "Invalid Action")


def _fault(code: int, text: str) -> str:
    return (
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{text}</errorDescription>"
        "</UPnPError></detail></s:Fault>"
    )


def _envelope(action: str, status: int, body: str) -> bytes:
    inner = (
        body
        if status != 200
        else f'<u:{action}Response xmlns:u="{WANIP}">{body}</u:{action}Response>'
    )
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f"<s:Body>{inner}</s:Body></s:Envelope>"
    ).encode()


def serve_http(gateway: Gateway) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._reply(200, DESCRIPTION.encode(), "text/xml")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
            action = self.headers.get("SOAPAction", "").strip('"').rsplit("#", 1)[-1]
            args = dict(re.findall(r"<(New\w+)>([^<]*)</\1>", body))
            status, payload = gateway.soap(action, args)
            print("soap", action, args, status, flush=True)
            self._reply(status, _envelope(action, status, payload), 'text/xml; charset="utf-8"')

        def _reply(self, status: int, data: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer((gateway.lan_ip, HTTP_PORT), Handler).serve_forever()


def serve_ssdp(gateway: Gateway) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", SSDP_PORT))
    membership = struct.pack("4s4s", socket.inet_aton(SSDP_GROUP), socket.inet_aton(gateway.lan_ip))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    while True:
        data, sender = sock.recvfrom(2048)
        text = data.decode(errors="replace")
        if not text.startswith("M-SEARCH"):
            continue
        match = re.search(r"^ST:\s*(.+?)\s*$", text, re.IGNORECASE | re.MULTILINE)
        st = match.group(1) if match else "upnp:rootdevice"
        if (
            "InternetGatewayDevice" not in st
            and "WAN" not in st
            and st not in ("ssdp:all", "upnp:rootdevice")
        ):
            continue
        reply = (
            "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
            f"ST: {st}\r\nUSN: {UUID}::{st}\r\nEXT:\r\nSERVER: Linux UPnP/1.0 shoal-lab-igd/1\r\n"
            f"LOCATION: http://{gateway.lan_ip}:{HTTP_PORT}/rootDesc.xml\r\n\r\n"
        )
        sock.sendto(reply.encode(), sender)


def main() -> None:
    gateway = Gateway(*sys.argv[1:4])
    threading.Thread(target=serve_ssdp, args=(gateway,), daemon=True).start()
    print("igd ready", flush=True)
    serve_http(gateway)


if __name__ == "__main__":
    main()
