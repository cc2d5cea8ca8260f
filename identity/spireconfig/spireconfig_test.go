package spireconfig

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/hcl"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// root is the tree under test.
var root = filepath.Join("..", "..", "spire-config")

// clusters are the kind clusters of the fedmesh setup; each is its own trust
// domain <name>.fedmesh.test and federates with every other.
var clusters = []string{"east", "west", "north"}

func trustDomain(cluster string) string { return cluster + ".fedmesh.test" }

// spireServerID is the SPIFFE ID a SPIRE server presents on its bundle
// endpoint (fixed by SPIRE).
func spireServerID(td string) string { return "spiffe://" + td + "/spire/server" }

const idTemplate = "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"

// --- the parsed tree -------------------------------------------------------

type profile struct {
	EndpointSPIFFEID string `hcl:"endpoint_spiffe_id"`
}

type federatesWith struct {
	BundleEndpointURL     string             `hcl:"bundle_endpoint_url"`
	BundleEndpointProfile map[string]profile `hcl:"bundle_endpoint_profile"`
}

type serverConf struct {
	Server struct {
		BindPort    string `hcl:"bind_port"`
		SocketPath  string `hcl:"socket_path"`
		TrustDomain string `hcl:"trust_domain"`
		CATTL       string `hcl:"ca_ttl"`
		X509TTL     string `hcl:"default_x509_svid_ttl"`
		Federation  *struct {
			BundleEndpoint *struct {
				Port        int                `hcl:"port"`
				RefreshHint string             `hcl:"refresh_hint"`
				Profile     map[string]profile `hcl:"profile"`
			} `hcl:"bundle_endpoint"`
			FederatesWith map[string]federatesWith `hcl:"federates_with"`
		} `hcl:"federation"`
	} `hcl:"server"`
	Plugins map[string]map[string]plugin `hcl:"plugins"`
}

type agentConf struct {
	Agent struct {
		ServerAddress   string `hcl:"server_address"`
		ServerPort      string `hcl:"server_port"`
		SocketPath      string `hcl:"socket_path"`
		TrustBundlePath string `hcl:"trust_bundle_path"`
		TrustDomain     string `hcl:"trust_domain"`
	} `hcl:"agent"`
	Plugins map[string]map[string]plugin `hcl:"plugins"`
}

type plugin struct {
	PluginData map[string]any `hcl:"plugin_data"`
}

type controllerManagerConfig struct {
	Kind                  string   `json:"kind"`
	ClusterName           string   `json:"clusterName"`
	TrustDomain           string   `json:"trustDomain"`
	SPIREServerSocketPath string   `json:"spireServerSocketPath"`
	IgnoreNamespaces      []string `json:"ignoreNamespaces"`
}

type clusterSPIFFEID struct {
	Kind string `json:"kind"`
	Spec struct {
		SPIFFEIDTemplate string   `json:"spiffeIDTemplate"`
		FederatesWith    []string `json:"federatesWith"`
	} `json:"spec"`
}

type clusterFederatedTrustDomain struct {
	Kind     string `json:"kind"`
	Metadata struct {
		Name string `json:"name"`
	} `json:"metadata"`
	Spec struct {
		TrustDomain           string `json:"trustDomain"`
		BundleEndpointURL     string `json:"bundleEndpointURL"`
		BundleEndpointProfile struct {
			Type             string `json:"type"`
			EndpointSPIFFEID string `json:"endpointSPIFFEID"`
		} `json:"bundleEndpointProfile"`
	} `json:"spec"`
}

type kustomization struct {
	Resources          []string `json:"resources"`
	ConfigMapGenerator []struct {
		Name  string   `json:"name"`
		Files []string `json:"files"`
	} `json:"configMapGenerator"`
}

// base is what spire-config/base deploys.
type base struct {
	services    map[string]corev1.Service
	statefulSet appsv1.StatefulSet
	daemonSet   appsv1.DaemonSet
	configMaps  map[string]bool
	kust        kustomization
}

type cluster struct {
	name   string
	server serverConf
	agent  agentConf
	cm     controllerManagerConfig
	csid   clusterSPIFFEID
	cftds  []clusterFederatedTrustDomain
	kust   kustomization
	files  []string
}

// --- parsing ----------------------------------------------------------------

// documents splits a YAML file into its documents.
func documents(data []byte) [][]byte {
	var docs [][]byte
	for _, d := range bytes.Split(data, []byte("\n---\n")) {
		if len(bytes.TrimSpace(stripComments(d))) > 0 {
			docs = append(docs, d)
		}
	}
	return docs
}

func stripComments(d []byte) []byte {
	var out [][]byte
	for _, l := range bytes.Split(d, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out = append(out, l)
		}
	}
	return bytes.Join(out, []byte("\n"))
}

// decodeHCL decodes into v and checks every top-level block's keys against
// the keys SPIRE knows, so a typo is an error rather than a silent default.
func decodeHCL(data []byte, v any, known map[string][]string) error {
	if err := hcl.Decode(v, string(data)); err != nil {
		return err
	}
	var generic map[string]any
	if err := hcl.Decode(&generic, string(data)); err != nil {
		return err
	}
	for block, val := range generic {
		allowed, ok := known[block]
		if !ok {
			return fmt.Errorf("unknown top-level block %q", block)
		}
		if allowed == nil {
			continue // contents checked elsewhere (plugins, health_checks)
		}
		for _, m := range val.([]map[string]any) {
			for k := range m {
				if !slices.Contains(allowed, k) {
					return fmt.Errorf("%s: unknown key %q", block, k)
				}
			}
		}
	}
	return nil
}

var serverKeys = map[string][]string{
	"server": {"bind_address", "bind_port", "socket_path", "trust_domain", "data_dir", "log_level", "log_format", "log_file",
		"ca_key_type", "ca_ttl", "ca_subject", "default_x509_svid_ttl", "default_jwt_svid_ttl", "jwt_issuer", "jwt_key_type",
		"agent_ttl", "admin_ids", "audit_log_enabled", "federation", "ratelimit", "experimental"},
	"plugins":       nil,
	"health_checks": nil,
	"telemetry":     nil,
}

var agentKeys = map[string][]string{
	"agent": {"data_dir", "log_level", "log_format", "log_file", "server_address", "server_port", "socket_path",
		"trust_bundle_path", "trust_bundle_url", "trust_bundle_format", "trust_domain", "insecure_bootstrap",
		"join_token", "admin_socket_path", "sds", "experimental", "availability_target", "workload_x509_svid_key_type"},
	"plugins":       nil,
	"health_checks": nil,
	"telemetry":     nil,
}

func readFile(t *testing.T, parts ...string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(append([]string{root}, parts...)...))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func loadBase(t *testing.T) base {
	t.Helper()
	b := base{services: map[string]corev1.Service{}, configMaps: map[string]bool{}}
	if err := yaml.Unmarshal(readFile(t, "base", "kustomization.yaml"), &b.kust); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"server.yaml", "agent.yaml", "namespace.yaml"} {
		for i, doc := range documents(readFile(t, "base", f)) {
			var meta struct{ Kind string }
			if err := yaml.Unmarshal(doc, &meta); err != nil {
				t.Fatalf("base/%s document %d: %v", f, i, err)
			}
			switch meta.Kind {
			case "Service":
				var s corev1.Service
				mustStrict(t, doc, &s, f)
				b.services[s.Name] = s
			case "StatefulSet":
				mustStrict(t, doc, &b.statefulSet, f)
			case "DaemonSet":
				mustStrict(t, doc, &b.daemonSet, f)
			case "ConfigMap":
				var c corev1.ConfigMap
				mustStrict(t, doc, &c, f)
				b.configMaps[c.Name] = true
			}
		}
	}
	return b
}

func mustStrict(t *testing.T, doc []byte, v any, file string) {
	t.Helper()
	if err := yaml.UnmarshalStrict(doc, v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

func loadCluster(t *testing.T, name string) cluster {
	t.Helper()
	c := cluster{name: name}
	if err := decodeHCL(readFile(t, name, "server.conf"), &c.server, serverKeys); err != nil {
		t.Fatalf("%s/server.conf: %v", name, err)
	}
	if err := decodeHCL(readFile(t, name, "agent.conf"), &c.agent, agentKeys); err != nil {
		t.Fatalf("%s/agent.conf: %v", name, err)
	}
	if err := yaml.Unmarshal(readFile(t, name, "controller-manager.yaml"), &c.cm); err != nil {
		t.Fatalf("%s/controller-manager.yaml: %v", name, err)
	}
	if err := yaml.Unmarshal(readFile(t, name, "cluster-spiffeid.yaml"), &c.csid); err != nil {
		t.Fatalf("%s/cluster-spiffeid.yaml: %v", name, err)
	}
	for i, doc := range documents(readFile(t, name, "federation.yaml")) {
		var f clusterFederatedTrustDomain
		if err := yaml.Unmarshal(doc, &f); err != nil {
			t.Fatalf("%s/federation.yaml document %d: %v", name, i, err)
		}
		c.cftds = append(c.cftds, f)
	}
	if err := yaml.Unmarshal(readFile(t, name, "kustomization.yaml"), &c.kust); err != nil {
		t.Fatalf("%s/kustomization.yaml: %v", name, err)
	}
	entries, err := os.ReadDir(filepath.Join(root, name))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		c.files = append(c.files, e.Name())
	}
	return c
}

// --- tests --------------------------------------------------------------------

// TestEveryFileParses: every file under spire-config/ is HCL, YAML (each
// document an object with apiVersion and kind) or a shell script that bash
// accepts; nothing else hides there.
func TestEveryFileParses(t *testing.T) {
	n := 0
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		t.Run(rel, func(t *testing.T) {
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			switch filepath.Ext(p) {
			case ".conf":
				if _, err := hcl.ParseBytes(data); err != nil {
					t.Fatalf("hcl: %v", err)
				}
			case ".yaml":
				docs := documents(data)
				if len(docs) == 0 {
					t.Fatal("no yaml documents")
				}
				for i, doc := range docs {
					var obj map[string]any
					if err := yaml.UnmarshalStrict(doc, &obj); err != nil {
						t.Fatalf("document %d: %v", i, err)
					}
					if obj["apiVersion"] == nil || obj["kind"] == nil {
						t.Fatalf("document %d lacks apiVersion or kind", i)
					}
				}
			case ".sh":
				bash, err := exec.LookPath("bash")
				if err != nil {
					t.Skip("no bash to check the script with")
				}
				if out, err := exec.Command(bash, "-n", p).CombinedOutput(); err != nil {
					t.Fatalf("bash -n: %v\n%s", err, out)
				}
			default:
				t.Fatalf("unexpected file type %q (want .conf, .yaml or .sh)", filepath.Ext(p))
			}
		})
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 4+6*len(clusters) {
		t.Fatalf("only %d files under %s", n, root)
	}
}

// TestConsistency: the clusters' files agree with each other and with the
// shared manifests.
func TestConsistency(t *testing.T) {
	b := loadBase(t)
	var cs []cluster
	for _, name := range clusters {
		cs = append(cs, loadCluster(t, name))
	}
	if errs := check(b, cs); len(errs) > 0 {
		for _, e := range errs {
			t.Error(e)
		}
	}
	// base's resources are its own files or remote bases pinned to a ref.
	for _, r := range b.kust.Resources {
		if strings.HasPrefix(r, "https://") {
			if !strings.Contains(r, "?ref=v") {
				t.Errorf("base: remote resource %s is not pinned to a version", r)
			}
			continue
		}
		if _, err := os.Stat(filepath.Join(root, "base", r)); err != nil {
			t.Errorf("base: resource %s: %v", r, err)
		}
	}
	dirs, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		if d.IsDir() && d.Name() != "base" && !slices.Contains(clusters, d.Name()) {
			t.Errorf("directory %s is not a cluster of the kind setup %v", d.Name(), clusters)
		}
	}
}

// TestConsistencyCatchesMistakes: the check is not vacuous; each of these
// realistic mistakes is reported.
func TestConsistencyCatchesMistakes(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(b *base, cs []cluster)
		want   string
	}{
		{"one-sided federation", func(_ *base, cs []cluster) {
			delete(cs[1].server.Server.Federation.FederatesWith, trustDomain("east"))
		}, "not symmetric"},
		{"wrong endpoint id", func(_ *base, cs []cluster) {
			fw := cs[0].server.Server.Federation.FederatesWith[trustDomain("west")]
			fw.BundleEndpointProfile = map[string]profile{"https_spiffe": {EndpointSPIFFEID: "spiffe://west.fedmesh.test/spire/agent"}}
			cs[0].server.Server.Federation.FederatesWith[trustDomain("west")] = fw
		}, "endpoint_spiffe_id"},
		{"agent in another trust domain", func(_ *base, cs []cluster) {
			cs[2].agent.Agent.TrustDomain = "east.fedmesh.test"
		}, "agent trust_domain"},
		{"CR disagrees with server config", func(_ *base, cs []cluster) {
			cs[0].cftds[0].Spec.BundleEndpointURL = "https://elsewhere:30443"
		}, "ClusterFederatedTrustDomain"},
		{"ClusterSPIFFEID misses a peer", func(_ *base, cs []cluster) {
			cs[1].csid.Spec.FederatesWith = cs[1].csid.Spec.FederatesWith[:1]
		}, "federatesWith"},
		{"bundle endpoint port not exposed", func(_ *base, cs []cluster) {
			cs[2].server.Server.Federation.BundleEndpoint.Port = 9443
		}, "bundle_endpoint port"},
		{"node port changed", func(b *base, _ []cluster) {
			s := b.services["spire-server-bundle-endpoint"]
			s.Spec.Ports[0].NodePort = 31443
			b.services["spire-server-bundle-endpoint"] = s
		}, "bundle_endpoint_url"},
		{"psat cluster name", func(_ *base, cs []cluster) {
			cs[0].agent.Plugins["NodeAttestor"]["k8s_psat"].PluginData["cluster"] = "west"
		}, "k8s_psat"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := loadBase(t)
			var cs []cluster
			for _, name := range clusters {
				cs = append(cs, loadCluster(t, name))
			}
			tt.mutate(&b, cs)
			errs := check(b, cs)
			for _, e := range errs {
				if strings.Contains(e.Error(), tt.want) {
					return
				}
			}
			t.Fatalf("mistake not reported (want an error mentioning %q); got %v", tt.want, errs)
		})
	}
}

// check returns every inconsistency it finds.
func check(b base, cs []cluster) []error {
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	endpointSvc, ok := b.services["spire-server-bundle-endpoint"]
	if !ok || len(endpointSvc.Spec.Ports) != 1 {
		fail("base: Service spire-server-bundle-endpoint with one port is missing")
		return errs
	}
	nodePort := endpointSvc.Spec.Ports[0].NodePort
	targetPort := endpointSvc.Spec.Ports[0].TargetPort.IntValue()
	serverSvc := b.services["spire-server"]

	byTD := map[string]cluster{}
	for _, c := range cs {
		byTD[trustDomain(c.name)] = c
	}
	for _, c := range cs {
		td := trustDomain(c.name)
		s := c.server.Server
		// Trust domain everywhere.
		if s.TrustDomain != td {
			fail("%s: server trust_domain %q, want %q", c.name, s.TrustDomain, td)
		}
		if c.agent.Agent.TrustDomain != td {
			fail("%s: agent trust_domain %q, want %q", c.name, c.agent.Agent.TrustDomain, td)
		}
		if c.cm.TrustDomain != td || c.cm.ClusterName != c.name {
			fail("%s: controller-manager trustDomain %q clusterName %q, want %q %q", c.name, c.cm.TrustDomain, c.cm.ClusterName, td, c.name)
		}
		// Node attestation: the agent's cluster is the one the server accepts.
		psatClusters := digMap(c.server.Plugins, "NodeAttestor", "k8s_psat", "clusters")
		if _, ok := psatClusters[c.name]; !ok || len(psatClusters) != 1 {
			fail("%s: server k8s_psat clusters %v, want exactly %q", c.name, keys(psatClusters), c.name)
		}
		if allow := digList(psatClusters[c.name], "service_account_allow_list"); !slices.Contains(allow, b.daemonSet.Namespace+":"+b.daemonSet.Spec.Template.Spec.ServiceAccountName) {
			fail("%s: server k8s_psat allow list %v lacks the agent's service account", c.name, allow)
		}
		if got := pluginString(c.agent.Plugins, "NodeAttestor", "k8s_psat", "cluster"); got != c.name {
			fail("%s: agent k8s_psat cluster %q, want %q", c.name, got, c.name)
		}
		if _, ok := c.agent.Plugins["WorkloadAttestor"]["k8s"]; !ok {
			fail("%s: agent has no k8s workload attestor", c.name)
		}
		// Agent reaches the server through the base Service.
		if c.agent.Agent.ServerAddress != serverSvc.Name+"."+serverSvc.Namespace || len(serverSvc.Spec.Ports) != 1 ||
			c.agent.Agent.ServerPort != fmt.Sprint(serverSvc.Spec.Ports[0].Port) || s.BindPort != fmt.Sprint(serverSvc.Spec.Ports[0].TargetPort.IntValue()) {
			fail("%s: agent server %s:%s / server bind_port %s do not match Service spire-server", c.name, c.agent.Agent.ServerAddress, c.agent.Agent.ServerPort, s.BindPort)
		}
		// Sockets and bundles are where the manifests mount them.
		if c.cm.SPIREServerSocketPath != s.SocketPath {
			fail("%s: controller-manager socket %q, server socket_path %q", c.name, c.cm.SPIREServerSocketPath, s.SocketPath)
		}
		for _, ctr := range b.statefulSet.Spec.Template.Spec.Containers {
			if !mounts(ctr, path.Dir(s.SocketPath)) {
				fail("%s: container %s does not mount the server socket dir %s", c.name, ctr.Name, path.Dir(s.SocketPath))
			}
		}
		agentCtr := b.daemonSet.Spec.Template.Spec.Containers[0]
		if !mounts(agentCtr, path.Dir(c.agent.Agent.SocketPath)) || !mounts(agentCtr, path.Dir(c.agent.Agent.TrustBundlePath)) {
			fail("%s: agent socket %s or bundle %s is not on a mounted volume", c.name, c.agent.Agent.SocketPath, c.agent.Agent.TrustBundlePath)
		}
		if cm := pluginString(c.server.Plugins, "Notifier", "k8sbundle", "config_map"); !b.configMaps[cm] {
			fail("%s: k8sbundle notifier writes ConfigMap %q, which base does not define", c.name, cm)
		}
		// CA lifetime covers SVIDs after rotation (same rule as the issuer).
		caTTL, err1 := time.ParseDuration(s.CATTL)
		svidTTL, err2 := time.ParseDuration(s.X509TTL)
		if err1 != nil || err2 != nil || caTTL < 4*svidTTL {
			fail("%s: ca_ttl %q must be at least 4x default_x509_svid_ttl %q", c.name, s.CATTL, s.X509TTL)
		}
		// The bundle endpoint is served with https_spiffe on the exposed port.
		if s.Federation == nil || s.Federation.BundleEndpoint == nil {
			fail("%s: no federation bundle_endpoint", c.name)
			continue
		}
		be := s.Federation.BundleEndpoint
		if be.Port != targetPort {
			fail("%s: bundle_endpoint port %d, but Service spire-server-bundle-endpoint targets %d", c.name, be.Port, targetPort)
		}
		if _, ok := be.Profile["https_spiffe"]; !ok || len(be.Profile) != 1 {
			fail("%s: bundle_endpoint profile %v, want https_spiffe", c.name, keys(be.Profile))
		}
		// Federation: full mesh, symmetric, URLs and IDs of the peer.
		var peers []string
		for _, p := range cs {
			if p.name != c.name {
				peers = append(peers, trustDomain(p.name))
			}
		}
		sort.Strings(peers)
		if got := keys(s.Federation.FederatesWith); !slices.Equal(got, peers) {
			fail("%s: federates_with %v, want every other cluster %v", c.name, got, peers)
		}
		for ptd, fw := range s.Federation.FederatesWith {
			peer, ok := byTD[ptd]
			if !ok {
				fail("%s: federates_with %s, not a cluster of the setup", c.name, ptd)
				continue
			}
			if peer.server.Server.Federation == nil || !hasKey(peer.server.Server.Federation.FederatesWith, td) {
				fail("%s federates with %s but not back: federation is not symmetric", c.name, ptd)
			}
			if want := fmt.Sprintf("https://%s-control-plane:%d", peer.name, nodePort); fw.BundleEndpointURL != want {
				fail("%s: federates_with %s bundle_endpoint_url %q, want %q (the peer's NodePort)", c.name, ptd, fw.BundleEndpointURL, want)
			}
			prof, ok := fw.BundleEndpointProfile["https_spiffe"]
			if !ok || len(fw.BundleEndpointProfile) != 1 {
				fail("%s: federates_with %s profile %v, want https_spiffe", c.name, ptd, keys(fw.BundleEndpointProfile))
			} else if prof.EndpointSPIFFEID != spireServerID(ptd) {
				fail("%s: federates_with %s endpoint_spiffe_id %q, want %q", c.name, ptd, prof.EndpointSPIFFEID, spireServerID(ptd))
			}
		}
		// spire-controller-manager resources say the same.
		if c.csid.Kind != "ClusterSPIFFEID" || c.csid.Spec.SPIFFEIDTemplate != idTemplate {
			fail("%s: ClusterSPIFFEID template %q, want %q", c.name, c.csid.Spec.SPIFFEIDTemplate, idTemplate)
		}
		if got := slices.Sorted(slices.Values(c.csid.Spec.FederatesWith)); !slices.Equal(got, peers) {
			fail("%s: ClusterSPIFFEID federatesWith %v, want %v", c.name, got, peers)
		}
		var crTDs []string
		for _, f := range c.cftds {
			crTDs = append(crTDs, f.Spec.TrustDomain)
			fw, ok := s.Federation.FederatesWith[f.Spec.TrustDomain]
			if f.Kind != "ClusterFederatedTrustDomain" || !ok {
				fail("%s: ClusterFederatedTrustDomain %s has no federates_with in server.conf", c.name, f.Spec.TrustDomain)
				continue
			}
			if f.Spec.BundleEndpointURL != fw.BundleEndpointURL || f.Spec.BundleEndpointProfile.Type != "https_spiffe" ||
				f.Spec.BundleEndpointProfile.EndpointSPIFFEID != fw.BundleEndpointProfile["https_spiffe"].EndpointSPIFFEID {
				fail("%s: ClusterFederatedTrustDomain %s (%s, %s %s) disagrees with server.conf federates_with", c.name, f.Spec.TrustDomain,
					f.Spec.BundleEndpointURL, f.Spec.BundleEndpointProfile.Type, f.Spec.BundleEndpointProfile.EndpointSPIFFEID)
			}
		}
		if slices.Sort(crTDs); !slices.Equal(crTDs, peers) {
			fail("%s: ClusterFederatedTrustDomains for %v, want one per peer %v", c.name, crTDs, peers)
		}
		// The overlay uses base, generates the ConfigMaps base mounts, and
		// every file in the directory is used.
		if !slices.Contains(c.kust.Resources, "../base") {
			fail("%s: kustomization does not use ../base", c.name)
		}
		used := map[string]bool{"kustomization.yaml": true}
		for _, r := range c.kust.Resources {
			used[r] = true
		}
		for _, g := range c.kust.ConfigMapGenerator {
			if !volumeUsesConfigMap(b, g.Name) {
				fail("%s: generated ConfigMap %s is not mounted by base", c.name, g.Name)
			}
			for _, f := range g.Files {
				used[f] = true
			}
		}
		for _, f := range c.files {
			if !used[f] {
				fail("%s: file %s is not referenced by kustomization.yaml", c.name, f)
			}
		}
	}
	return errs
}

func mounts(c corev1.Container, dir string) bool {
	return slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == dir })
}

func volumeUsesConfigMap(b base, name string) bool {
	for _, vols := range [][]corev1.Volume{b.statefulSet.Spec.Template.Spec.Volumes, b.daemonSet.Spec.Template.Spec.Volumes} {
		for _, v := range vols {
			if v.ConfigMap != nil && v.ConfigMap.Name == name {
				return true
			}
		}
	}
	return false
}

func keys[V any](m map[string]V) []string {
	return slices.Sorted(func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	})
}

func hasKey[V any](m map[string]V, k string) bool { _, ok := m[k]; return ok }

// HCL v1 decodes nested objects inside plugin_data as lists of maps; these
// helpers walk them.

func unwrap(v any) map[string]any {
	switch x := v.(type) {
	case map[string]any:
		return x
	case []map[string]any:
		out := map[string]any{}
		for _, m := range x {
			for k, v := range m {
				out[k] = v
			}
		}
		return out
	}
	return nil
}

func digMap(plugins map[string]map[string]plugin, typ, name, key string) map[string]any {
	return unwrap(plugins[typ][name].PluginData[key])
}

func digList(v any, key string) []string {
	var out []string
	if l, ok := unwrap(v)[key].([]any); ok {
		for _, x := range l {
			if s, ok := x.(string); ok {
				out = append(out, s)
			}
		}
	}
	return out
}

func pluginString(plugins map[string]map[string]plugin, typ, name, key string) string {
	s, _ := plugins[typ][name].PluginData[key].(string)
	return s
}
