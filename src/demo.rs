//! Demo mode: a demo restaurant whose guests order and whose staff move
//! orders along, published through the same path as the HTTP endpoint, so
//! a newcomer sees the board come alive with nothing else installed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::PublishRequest;
use crate::config::Config;
use crate::domain::{
    EventBody, EventKind, ORDER_STATUSES, Order, OrderItem, RestaurantId, SnapshotSource,
    format_timestamp,
};
use crate::node::Node;

pub const DEMO_RESTAURANT: Uuid = Uuid::from_u128(0x11111111_1111_1111_1111_111111111111);
pub const DEMO_USER: Uuid = Uuid::from_u128(0x22222222_2222_2222_2222_222222222222);

const MENU: [(&str, f64); 6] = [
    ("Margherita", 9.5),
    ("Carbonara", 12.0),
    ("Tiramisu", 6.5),
    ("Lemonade", 3.0),
    ("Caesar salad", 8.0),
    ("Espresso", 2.5),
];
/// The forward path of an order: every status but `cancelled`.
const FLOW: &[&str] = ORDER_STATUSES.split_at(6).0;

#[derive(Clone)]
pub struct Demo {
    node: Node,
    restaurant: RestaurantId,
    token: String,
    /// The simulator's orders; also what snapshots show (no database here).
    orders: Arc<Mutex<BTreeMap<Uuid, Order>>>,
}

impl Demo {
    pub fn new(node: Node, cfg: &Config) -> anyhow::Result<Demo> {
        let secret = cfg
            .jwt_secret
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("DEMO needs JWT_SECRET (generated when unset)"))?;
        let mut claims = json!({
            "sub": DEMO_USER,
            "restaurant_id": DEMO_RESTAURANT,
            "role": "authenticated",
            "exp": Utc::now().timestamp() + 7 * 24 * 3600,
        });
        if let Some(aud) = &cfg.jwt_audience {
            claims["aud"] = aud.as_str().into();
        }
        if let Some(iss) = &cfg.jwt_issuer {
            claims["iss"] = iss.as_str().into();
        }
        let token = encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )?;
        Ok(Demo {
            node,
            restaurant: RestaurantId(DEMO_RESTAURANT),
            token,
            orders: Arc::new(Mutex::new(BTreeMap::new())),
        })
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub async fn run(self, base_url: String, stop: CancellationToken) {
        let url = format!("{base_url}/?token={}", self.token);
        println!("\n  orders-gateway demo: open the live board at\n\n    {url}\n");
        tracing::info!(
            "demo mode: simulating guests of restaurant {}",
            self.restaurant
        );
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(2500)) => {}
            }
            n += 1;
            if let Err(e) = self.step(n).await {
                tracing::warn!(error = %e, "demo step failed");
            }
        }
    }

    async fn step(&self, n: u64) -> anyhow::Result<()> {
        let open: Vec<Order> = self
            .orders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let now = Utc::now();
        let (kind, previous, order) = if open.len() < 4 || n.is_multiple_of(2) && open.len() < 12 {
            let items: Vec<OrderItem> = (0..1 + n as usize % 3)
                .map(|i| {
                    let (name, price) = MENU[(n as usize + i) % MENU.len()];
                    OrderItem {
                        id: Uuid::new_v4(),
                        menu_item_id: Some(Uuid::from_u128(
                            0xa000 + ((n as usize + i) % MENU.len()) as u128,
                        )),
                        quantity: Some(1 + (i as i32 % 2)),
                        unit_price: Some(price),
                        name: Some(name.into()),
                    }
                })
                .collect();
            let total: f64 = items
                .iter()
                .map(|i| i.unit_price.unwrap_or(0.0) * i.quantity.unwrap_or(1) as f64)
                .sum();
            let order = Order {
                id: Uuid::new_v4(),
                order_number: Some(format!("ORD-{}-{:04}", now.format("%y%m%d"), n)),
                restaurant_id: self.restaurant.0,
                table_number: Some(1 + (n % 12) as i32),
                customer_name: Some(
                    ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima"][n as usize % 6].into(),
                ),
                customer_phone: None,
                order_status: Some("pending".into()),
                payment_status: Some("pending".into()),
                payment_method: Some(if n.is_multiple_of(3) { "card" } else { "cash" }.into()),
                total_price: Some((total * 100.0).round() / 100.0),
                estimated_time: Some(10 + (n % 4) as i32 * 5),
                created_at: Some(now),
                updated_at: now,
                items,
            };
            (EventKind::OrderCreated, None, order)
        } else {
            let mut order = open
                .iter()
                .min_by_key(|o| o.updated_at)
                .cloned()
                .expect("open is not empty");
            let at = FLOW
                .iter()
                .position(|s| Some(*s) == order.order_status.as_deref())
                .unwrap_or(0);
            let previous = order.order_status.clone();
            let next = FLOW[(at + 1).min(FLOW.len() - 1)];
            order.order_status = Some(next.into());
            if next == "served" {
                order.payment_status = Some("paid".into());
            }
            order.updated_at = now;
            (EventKind::OrderStatusChanged, previous, order)
        };
        {
            let mut orders = self.orders.lock().unwrap_or_else(|p| p.into_inner());
            if order.is_open() {
                orders.insert(order.id, order.clone());
            } else {
                orders.remove(&order.id);
            }
        }
        let body = serde_json::to_string(&EventBody {
            kind,
            previous_status: previous.as_deref(),
            order: &order,
            timestamp: format_timestamp(now),
        })?;
        self.node
            .publish(PublishRequest {
                restaurant: self.restaurant,
                version: Some(order.version()),
                body,
                fence: None,
            })
            .await?;
        Ok(())
    }
}

#[async_trait]
impl SnapshotSource for Demo {
    async fn open_orders(&self, r: RestaurantId) -> Result<Vec<Order>, String> {
        if r != self.restaurant {
            return Ok(Vec::new());
        }
        let orders = self.orders.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<Order> = orders.values().cloned().collect();
        list.sort_by_key(|o| o.created_at);
        Ok(list)
    }
}
