// Command fedmesh-init is the injected init container: it installs the
// redirect of the pod's traffic to its sidecar (package injector/redirect)
// in the pod's network namespace, with nftables over netlink, and exits. It
// runs as root with NET_ADMIN only, before the app and the sidecar start.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/fedmesh/fedmesh/injector/redirect"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "fedmesh-init:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("fedmesh-init", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: fedmesh-init [flags]\n\nInstalls the nftables table %q that sends the pod's TCP traffic (and DNS) to its\nfedmesh sidecar; run by the injected init container in the pod's network namespace.\n\n", redirect.Table)
		fs.PrintDefaults()
	}
	in := fs.Uint("inbound-port", 15006, "the sidecar's inbound port: every inbound TCP connection goes there")
	out := fs.Uint("outbound-port", 15001, "the sidecar's transparent outbound port: every outbound TCP connection goes there")
	dns := fs.Uint("dns-port", 15053, "the sidecar's DNS port: outbound DNS (UDP and TCP port 53) goes there")
	probe := fs.Uint("probe-port", 15021, "the sidecar's probe port, never redirected")
	exclude := fs.String("exclude-inbound-ports", "", "comma-separated inbound ports that reach the app directly")
	uid := fs.Uint("proxy-uid", 1337, "the sidecar's UID: its own connections are not redirected")
	noDNS := fs.Bool("no-dns-capture", false, "leave outbound DNS alone")
	remove := fs.Bool("remove", false, "remove the table instead")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (flags only; see --help)", fs.Arg(0))
	}
	if *remove {
		return redirect.Remove()
	}
	r := redirect.Rules{ProxyUID: uint32(*uid), NoDNSCapture: *noDNS}
	var errs []error
	for _, p := range []struct {
		name string
		v    uint
		dst  *uint16
	}{{"--inbound-port", *in, &r.InboundPort}, {"--outbound-port", *out, &r.OutboundPort}, {"--dns-port", *dns, &r.DNSPort}, {"--probe-port", *probe, &r.ProbePort}} {
		if p.v < 1 || p.v > 65535 {
			errs = append(errs, fmt.Errorf("%s %d is not a port (1-65535)", p.name, p.v))
			continue
		}
		*p.dst = uint16(p.v)
	}
	for _, f := range strings.Split(*exclude, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := strconv.ParseUint(f, 10, 16)
		if err != nil || p == 0 {
			errs = append(errs, fmt.Errorf("--exclude-inbound-ports: %q is not a port (1-65535)", f))
			continue
		}
		r.ExcludeInboundPorts = append(r.ExcludeInboundPorts, uint16(p))
	}
	if *uid > 1<<32-1 {
		errs = append(errs, fmt.Errorf("--proxy-uid %d is out of range", *uid))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := r.Apply(); err != nil {
		return err
	}
	fmt.Printf("fedmesh-init: redirect installed (nftables table inet %s): inbound TCP -> :%d, outbound TCP -> :%d%s, sidecar uid %d exempt\n",
		redirect.Table, r.InboundPort, r.OutboundPort, dnsNote(r), r.ProxyUID)
	return nil
}

func dnsNote(r redirect.Rules) string {
	if r.NoDNSCapture {
		return ""
	}
	return fmt.Sprintf(", DNS -> :%d", r.DNSPort)
}
