//! Leader election against a real API server: of two replicas competing for the same Lease
//! exactly one leads; the standby takes over when the leader dies or releases the lease; and
//! without election the agent leads alone, with no Lease at all.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gitops_agent::leader::{LeaderError, Leadership, default_identity};
use gitops_tests::cluster::{self, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::ListParams;
use tokio::task::JoinHandle;

const LEASE: &str = "gitops-agent";
/// Short, so that a lease left behind by a killed leader expires within the test.
const SHORT: Duration = Duration::from_secs(3);

async fn replica(client: &kube::Client, ns: &str, identity: &str, duration: Duration) -> Leadership {
    Leadership::start(client.clone(), ns, LEASE, identity, duration)
        .await
        .unwrap_or_else(|e| panic!("starting leader election as {identity}: {e}"))
}

async fn holder(client: &kube::Client, ns: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), ns).get_opt(LEASE).await.expect("reading the lease")?;
    lease.spec?.holder_identity
}

/// Flags any moment at which both replicas lead, as seen through their change notifications.
/// Sampling alone could miss a short overlap.
fn overlap_monitor(a: &Leadership, b: &Leadership) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let both = Arc::new(AtomicBool::new(false));
    let (mut a, mut b) = (a.changes(), b.changes());
    let flag = both.clone();
    let task = tokio::spawn(async move {
        loop {
            if *a.borrow_and_update() && *b.borrow_and_update() {
                flag.store(true, Ordering::SeqCst);
            }
            let changed = tokio::select! {
                changed = a.changed() => changed,
                changed = b.changed() => changed,
            };
            if changed.is_err() {
                return;
            }
        }
    });
    (both, task)
}

/// Waits until exactly one of `replicas` leads and returns its index; fails if two ever do.
async fn sole_leader(replicas: [&Leadership; 2]) -> usize {
    eventually("one replica to become leader", || async {
        let leading: Vec<usize> = (0..2).filter(|&i| replicas[i].is_leader()).collect();
        assert!(leading.len() < 2, "both replicas lead at once");
        leading.first().copied()
    })
    .await
}

#[tokio::test]
async fn of_two_replicas_exactly_one_leads_across_renewals() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "leader-one").await;
    let names = ["replica-a", "replica-b"];
    let a = replica(&client, &ns, names[0], SHORT).await;
    let b = replica(&client, &ns, names[1], SHORT).await;
    let (both, monitor) = overlap_monitor(&a, &b);

    sole_leader([&a, &b]).await;
    // The holder renews several times in the meantime; by counting renewals rather than
    // seconds the check spans a few renewals however slow the machine is.
    let renewals = RefCell::new(HashSet::new());
    eventually("four renewals of the lease", || async {
        assert!(!(a.is_leader() && b.is_leader()), "both replicas lead at once");
        let lease = Api::<Lease>::namespaced(client.clone(), &ns).get(LEASE).await.expect("reading the lease");
        let mut renewals = renewals.borrow_mut();
        renewals.extend(lease.spec.and_then(|spec| spec.renew_time).map(|time| time.0));
        (renewals.len() >= 4).then_some(())
    })
    .await;

    let leader = sole_leader([&a, &b]).await;
    eventually("the lease to name the leader", || async {
        (holder(&client, &ns).await.as_deref() == Some(names[leader])).then_some(())
    })
    .await;
    monitor.abort();
    assert!(!both.load(Ordering::SeqCst), "both replicas led at the same moment");
}

#[tokio::test]
async fn the_standby_takes_over_from_a_leader_that_dies_without_releasing() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "leader-killed").await;
    let names = ["replica-a", "replica-b"];
    let a = replica(&client, &ns, names[0], SHORT).await;
    let b = replica(&client, &ns, names[1], SHORT).await;
    let leader = sole_leader([&a, &b]).await;
    let (dead, standby, standby_name) = if leader == 0 { (a, b, names[1]) } else { (b, a, names[0]) };

    // Dropping stops the renewals without touching the lease, as SIGKILL would: the standby
    // can take over only once the lease has expired.
    drop(dead);

    eventually("the standby to become leader", || async { standby.is_leader().then_some(()) }).await;
    assert_eq!(holder(&client, &ns).await.as_deref(), Some(standby_name));
}

#[tokio::test]
async fn a_released_lease_passes_to_the_standby_before_it_would_expire() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "leader-released").await;
    let names = ["replica-a", "replica-b"];
    // Longer than `eventually` waits: the standby can take over in time only because the lease
    // was released, not because it expired.
    let long = Duration::from_secs(600);
    let leader = replica(&client, &ns, names[0], long).await;
    eventually("the first replica to become leader", || async { leader.is_leader().then_some(()) }).await;
    let standby = replica(&client, &ns, names[1], long).await;
    // Not a bound on anything: it gives the standby time to see the lease held and go to sleep
    // until its expiry, as a standby usually has. Were it still awake, the test would prove less.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!standby.is_leader(), "the standby does not lead while the lease is held");

    let changes = leader.changes();
    leader.release().await;
    assert!(!*changes.borrow(), "a released replica no longer leads");

    eventually("the standby to become leader", || async { standby.is_leader().then_some(()) }).await;
    assert_eq!(holder(&client, &ns).await.as_deref(), Some(names[1]));
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_stops_leading_and_leads_again_once_back() {
    // A control plane of its own: this test stops the API server.
    let mut plane = cluster::private().await;
    let client = plane.client().await.unwrap();
    let leader = replica(&client, "default", "replica-a", SHORT).await;
    eventually("the replica to become leader", || async { leader.is_leader().then_some(()) }).await;

    // Nobody else could take the lease over now, but nor can the leader show that it still
    // holds it: it must stop before others would count the lease as expired.
    plane.stop_component("kube-apiserver").unwrap();
    eventually("the cut-off replica to stop leading", || async { (!leader.is_leader()).then_some(()) }).await;

    plane.start_component("kube-apiserver").unwrap();
    plane.wait_ready().await.unwrap();
    eventually("the replica to lead again", || async { leader.is_leader().then_some(()) }).await;
    let client = plane.client().await.unwrap();
    assert_eq!(holder(&client, "default").await.as_deref(), Some("replica-a"));
}

#[tokio::test]
async fn without_election_the_agent_always_leads_and_makes_no_lease() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "leader-off").await;
    let leadership = Leadership::always();
    assert!(leadership.is_leader());
    assert!(*leadership.changes().borrow());

    let leases = Api::<Lease>::namespaced(client, &ns).list(&ListParams::default()).await.expect("listing leases");
    assert!(leases.items.is_empty(), "no Lease: {:?}", leases.items);

    let changes = leadership.changes();
    leadership.release().await;
    assert!(!*changes.borrow(), "a released Leadership no longer leads");
}

#[tokio::test]
async fn a_too_short_lease_or_an_empty_identity_is_refused() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "leader-invalid").await;
    let too_short = Leadership::start(client.clone(), &ns, LEASE, "replica-a", Duration::from_secs(1)).await;
    assert!(matches!(too_short, Err(LeaderError::Duration(_))), "a 1s lease is refused");
    let anonymous = Leadership::start(client.clone(), &ns, LEASE, "", SHORT).await;
    assert!(matches!(anonymous, Err(LeaderError::EmptyIdentity)), "an empty identity is refused");
    assert!(!default_identity().is_empty());
}
