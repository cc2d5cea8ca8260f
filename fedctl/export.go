package fedctl

import (
	"context"
	"fmt"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/spf13/cobra"
)

func newExportCommand(g *globals) *cobra.Command {
	var ns, dryRun, output string
	var labels, annotations map[string]string
	cmd := &cobra.Command{
		Use:   "export SERVICE",
		Short: "Export a Service to the clusterset (write its ServiceExport)",
		Long: `export writes a ServiceExport (multicluster.x-k8s.io/v1beta1) for an existing
Service, so every member cluster gets a ServiceImport for it. The Service must
exist; --exported-label/--exported-annotation set what the ServiceImport carries.`,
		Example: `  fedctl export echo -n demo --context fedmesh-east
  fedctl export echo -n demo --exported-label tier=gold --dry-run=client -o yaml`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			se := &mcsv1beta1.ServiceExport{
				TypeMeta:   metav1.TypeMeta{APIVersion: mcsv1beta1.GroupVersion.String(), Kind: "ServiceExport"},
				ObjectMeta: metav1.ObjectMeta{Name: args[0], Namespace: ns},
				Spec:       mcsv1beta1.ServiceExportSpec{ExportedLabels: labels, ExportedAnnotations: annotations},
			}
			switch dryRun {
			case "client":
				return printObject(g.out, se, orDefault(output, "yaml"))
			case "", "none":
			default:
				return usagef("--dry-run must be client or none, got %q", dryRun)
			}
			m, err := g.one()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			kube, err := kubernetes.NewForConfig(m.config)
			if err != nil {
				return err
			}
			if _, err := kube.CoreV1().Services(ns).Get(ctx, args[0], metav1.GetOptions{}); apierrors.IsNotFound(err) {
				return fmt.Errorf("service %s/%s does not exist in %s: create it first (an export of a missing Service is reported as Valid=False/NoService)", ns, args[0], m.context)
			} else if err != nil {
				return fmt.Errorf("read service %s/%s in %s: %w", ns, args[0], m.context, err)
			}
			mcs, err := mcsclient.NewForConfig(m.config)
			if err != nil {
				return err
			}
			if _, err := mcs.MulticlusterV1beta1().ServiceExports(ns).Create(ctx, se, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
				return fmt.Errorf("%s/%s is already exported from %s", ns, args[0], m.context)
			} else if err != nil {
				return fmt.Errorf("create serviceexport %s/%s in %s: %w", ns, args[0], m.context, err)
			}
			if output != "" {
				return printObject(g.out, se, output)
			}
			fmt.Fprintf(g.out, "serviceexport %s/%s created in %s\n", ns, args[0], m.context)
			return waitExportConditions(ctx, g, mcs, ns, args[0])
		},
	}
	f := cmd.Flags()
	f.StringVarP(&ns, "namespace", "n", "default", "namespace of the Service")
	f.StringVar(&dryRun, "dry-run", "none", "client: print the ServiceExport without writing it")
	f.StringVarP(&output, "output", "o", "", "print the ServiceExport as yaml or json")
	f.StringToStringVar(&labels, "exported-label", nil, "label the ServiceImport carries (repeatable, k=v)")
	f.StringToStringVar(&annotations, "exported-annotation", nil, "annotation the ServiceImport carries (repeatable, k=v)")
	return cmd
}

// waitExportConditions shows the controller's verdict when it comes quickly.
func waitExportConditions(ctx context.Context, g *globals, mcs mcsclient.Interface, ns, name string) error {
	for range 30 {
		se, err := mcs.MulticlusterV1beta1().ServiceExports(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil && len(se.Status.Conditions) >= 3 {
			for _, c := range se.Status.Conditions {
				fmt.Fprintf(g.out, "  %-9s %-6s %-12s %s\n", c.Type, c.Status, c.Reason, c.Message)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-sleep100ms():
		}
	}
	fmt.Fprintln(g.out, "  (no conditions yet: is the federation controller running in this cluster?)")
	return nil
}

func newUnexportCommand(g *globals) *cobra.Command {
	var ns string
	cmd := &cobra.Command{
		Use:     "unexport SERVICE",
		Short:   "Stop exporting a Service (delete its ServiceExport)",
		Example: "  fedctl unexport echo -n demo --context fedmesh-east",
		Args:    exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := g.one()
			if err != nil {
				return err
			}
			mcs, err := mcsclient.NewForConfig(m.config)
			if err != nil {
				return err
			}
			err = mcs.MulticlusterV1beta1().ServiceExports(ns).Delete(cmd.Context(), args[0], metav1.DeleteOptions{})
			if apierrors.IsNotFound(err) {
				return fmt.Errorf("%s/%s is not exported from %s", ns, args[0], m.context)
			}
			if err != nil {
				return fmt.Errorf("delete serviceexport %s/%s in %s: %w", ns, args[0], m.context, err)
			}
			fmt.Fprintf(g.out, "serviceexport %s/%s deleted in %s\n", ns, args[0], m.context)
			return nil
		},
	}
	cmd.Flags().StringVarP(&ns, "namespace", "n", "default", "namespace of the Service")
	return cmd
}

func orDefault(s, def string) string {
	if strings.TrimSpace(s) == "" {
		return def
	}
	return s
}
